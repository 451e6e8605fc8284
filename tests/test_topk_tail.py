"""The top-k + tail generalized JSD (``losses/topk_tail.py``): against a plain float64 reference
built from a bucket-membership matrix, against the full JSD at k = V, padded / repeated /
k + 1 ids, masks, and the one-chunk memory bound."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from axolotl_gold.losses import generalized_jsd_token_loss
from axolotl_gold.losses.topk_tail import topk_tail_loss_sum, topk_tail_token_loss

GRID = list(itertools.product((0.0, 0.3, 0.5, 1.0), (1.0, 2.0)))


def rand(*shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def teacher_topk(n, vocab, k, seed):
    """A random full teacher distribution and its top-k (ids, log-probs)."""
    logp = torch.log_softmax(rand(n, vocab, seed=seed), -1)
    lp, ids = logp.topk(k, dim=-1)
    return logp, ids, lp


def reference(student_logits, ids, lp, beta, temperature):
    """Dense float64: a [n, V, K+1] membership matrix sums the student's tempered softmax into
    buckets; the teacher's tail is 1 - sum(top-k), spread evenly over the unlisted ids when
    tempered. Differentiable in the student logits."""
    n, vocab = student_logits.shape
    k = ids.shape[1]
    member = torch.zeros(n, vocab, k + 1, dtype=torch.float64)
    member[:, :, k] = 1.0
    for r in range(n):
        for j in range(k):
            member[r, ids[r, j], :] = 0.0
            member[r, ids[r, j], j] = 1.0
    s = torch.einsum("nv,nvb->nb", torch.softmax(student_logits / temperature, -1), member)
    p = lp.exp()
    r_tail = 1.0 - p.sum(-1)
    m = vocab - k
    t = torch.cat([p ** (1 / temperature), (m * (r_tail / m) ** (1 / temperature)).unsqueeze(-1)], -1)
    t = t / t.sum(-1, keepdim=True)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    mix = (1 - beta) * s + beta * t
    return beta * kl(t, mix) + (1 - beta) * kl(s, mix)


@pytest.mark.parametrize("beta,temperature", GRID)
def test_logits_path_matches_the_dense_reference(beta, temperature):
    n, vocab, k = 6, 40, 5
    z64 = rand(n, vocab, seed=1)
    _, ids, lp = teacher_topk(n, vocab, k, seed=2)
    z = z64.float().requires_grad_()
    z_ref = z64.clone().requires_grad_()
    got = topk_tail_token_loss(z, ids, lp.float(), beta=beta, temperature=temperature)
    want = reference(z_ref, ids, lp.float().double(), beta, temperature)  # the same teacher input
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = rand(n, seed=3)
    (g,) = torch.autograd.grad((got.double() * w).sum(), z)
    (g_ref,) = torch.autograd.grad((want * w).sum(), z_ref)
    # float32 logits, reverse KL of ~3 nats: about 1e-6 of cancellation in S (s - t - L)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("beta,temperature", GRID)
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_hidden_path_matches_the_dense_reference(beta, temperature, chunk_size):
    n, hidden, vocab, k = 9, 8, 50, 7
    h = rand(n, hidden, seed=4, scale=1.0).requires_grad_()
    w = rand(vocab, hidden, seed=5, scale=1.0).requires_grad_()
    b = rand(vocab, seed=6, scale=0.5).requires_grad_()
    _, ids, lp = teacher_topk(n, vocab, k, seed=7)
    got = topk_tail_loss_sum(h, w, ids, lp, beta=beta, temperature=temperature, chunk_size=chunk_size, student_bias=b)
    grads = torch.autograd.grad(got * 1.7, (h, w, b))
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (h, w, b))
    want = reference(h2 @ w2.t() + b2, ids, lp, beta, temperature).sum()
    grads_ref = torch.autograd.grad(want * 1.7, (h2, w2, b2))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_float32_head_and_frozen_head():
    n, hidden, vocab, k = 5, 8, 30, 4
    h = rand(n, hidden, seed=8, scale=1.0).float().requires_grad_()
    w = rand(vocab, hidden, seed=9, scale=1.0).float()  # frozen head: no weight gradient
    _, ids, lp = teacher_topk(n, vocab, k, seed=10)
    got = topk_tail_loss_sum(h, w, ids, lp.float(), chunk_size=2)
    (g,) = torch.autograd.grad(got, h)
    h2 = h.detach().double().requires_grad_()
    want = reference(h2 @ w.double().t(), ids, lp.float().double(), 0.5, 1.0).sum()
    (g_ref,) = torch.autograd.grad(want, h2)
    assert got.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta,temperature", GRID)
def test_k_equal_vocab_is_the_full_jsd(beta, temperature):
    """Every id listed (in a shuffled order): the tail is empty and the loss, values and
    gradients, is ``generalized_jsd_token_loss`` on the full teacher logits."""
    n, hidden, vocab = 7, 6, 23
    h = rand(n, hidden, seed=11, scale=1.0).requires_grad_()
    w = rand(vocab, hidden, seed=12, scale=1.0).requires_grad_()
    teacher_logits = rand(n, vocab, seed=13)
    logp = torch.log_softmax(teacher_logits, -1)
    ids = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(r)) for r in range(n)])
    got = topk_tail_loss_sum(h, w, ids, logp.gather(1, ids), beta=beta, temperature=temperature, chunk_size=3)
    g = torch.autograd.grad(got, (h, w))
    h2, w2 = (x.detach().clone().requires_grad_() for x in (h, w))
    want = generalized_jsd_token_loss(h2 @ w2.t(), teacher_logits, beta=beta, temperature=temperature).sum()
    g_ref = torch.autograd.grad(want, (h2, w2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(a).all()


def test_padding_repeats_and_an_extra_entry():
    """vLLM lists k + 1 entries where the scored token is outside the top-k: one more bucket.
    Rows padded to a common width with -1, and an id listed twice (its first entry kept),
    give the loss of the compact lists."""
    vocab, k = 20, 3
    z = rand(3, vocab, seed=14).requires_grad_()
    logp = torch.log_softmax(rand(3, vocab, seed=15), -1)
    top = logp.topk(k, -1).indices
    extra = torch.tensor([[17], [4], [9]])
    extra = torch.where((extra == top).any(-1, keepdim=True), top[:, :1] * 0 + 19, extra)
    compact = torch.cat([top, extra], -1)  # k + 1 entries for every row
    want = reference(z.detach().clone().requires_grad_(), compact, logp.gather(1, compact), 0.5, 1.0)
    # row 0: k + 1 entries; row 1: only k (padded); row 2: an id repeated, then padding
    ids = torch.tensor([
        compact[0].tolist() + [-1, -1],
        top[1].tolist() + [-1, -1, -1],
        compact[2].tolist()[:2] + [int(compact[2, 0])] + compact[2].tolist()[2:] + [-1],
    ])
    lp = torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)), torch.tensor(float("nan")))
    lp[2, 2] = -0.01  # the repeat's value is ignored: the first entry counts
    got = topk_tail_token_loss(z, ids, lp.nan_to_num(-5.0), beta=0.5)
    want1 = reference(z.detach().clone(), top, logp.gather(1, top), 0.5, 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want1[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got.sum(), z)
    assert torch.isfinite(g).all()


def test_ids_outside_the_vocabulary_raise():
    with pytest.raises(ValueError, match="outside the compared vocabulary of 10"):
        topk_tail_token_loss(torch.zeros(1, 10), torch.tensor([[3, 10]]), torch.tensor([[-1.0, -2.0]]))


def test_masked_rows_contribute_nothing():
    n, hidden, vocab, k = 8, 4, 25, 3
    h = rand(n, hidden, seed=16, scale=1.0).requires_grad_()
    w = rand(vocab, hidden, seed=17, scale=1.0)
    _, ids, lp = teacher_topk(n, vocab, k, seed=18)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    lp_bad = lp.clone()
    lp_bad[~mask] = float("nan")  # what sits in unscored positions is never read
    ids_bad = ids.clone()
    ids_bad[~mask] = 10**6
    got = topk_tail_loss_sum(h, w, ids_bad, lp_bad, mask=mask, chunk_size=2)
    (g,) = torch.autograd.grad(got, h)
    h2 = h.detach().clone().requires_grad_()
    want = topk_tail_loss_sum(h2[mask], w, ids[mask], lp[mask], chunk_size=2)
    (g_ref,) = torch.autograd.grad(want, h2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_ref)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


def test_row_weights_are_repeats():
    n, hidden, vocab, k = 4, 4, 15, 3
    h = rand(n, hidden, seed=19, scale=1.0)
    w = rand(vocab, hidden, seed=20, scale=1.0)
    _, ids, lp = teacher_topk(n, vocab, k, seed=21)
    repeats = torch.tensor([1, 3, 2, 1])
    got = topk_tail_loss_sum(h, w, ids, lp, weights=repeats)
    idx = torch.repeat_interleave(torch.arange(n), repeats)
    torch.testing.assert_close(got, topk_tail_loss_sum(h[idx], w, ids[idx], lp[idx]))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_peaked_teacher_stays_finite(beta):
    """A top log-prob of 0.0 (float32 rounding of a peaked teacher) leaves a floored tail, not
    an infinite reverse KL."""
    z = rand(2, 12, seed=22).requires_grad_()
    ids = torch.tensor([[3, 5], [7, 1]])
    lp = torch.tensor([[0.0, -20.0], [-1e-9, -25.0]])
    loss = topk_tail_token_loss(z, ids, lp, beta=beta)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


class Largest(TorchDispatchMode):
    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                Largest.numel = max(Largest.numel, t.numel())
        return out


def test_at_most_one_chunk_of_logits_exists():
    n, hidden, vocab, k, chunk = 64, 4, 500, 6, 8
    h = rand(n, hidden, seed=23, scale=1.0).float().requires_grad_()
    w = rand(vocab, hidden, seed=24, scale=1.0).float().requires_grad_()
    _, ids, lp = teacher_topk(n, vocab, k, seed=25)
    Largest.numel = 0
    with Largest():
        topk_tail_loss_sum(h, w, ids, lp.float(), chunk_size=chunk).backward()
    assert Largest.numel <= chunk * (vocab + 1) < n * vocab
