"""generalized_jsd_token_loss / generalized_jsd_loss against a float64 reference and TRL's."""

import itertools
import os

import pytest
import torch

from axolotl_gold.losses import generalized_jsd_loss, generalized_jsd_token_loss

BETAS = (0.0, 0.3, 0.5, 1.0)
TEMPERATURES = (1.0, 2.0)
GRID = list(itertools.product(BETAS, TEMPERATURES))


def reference_jsd(student_logits, teacher_logits, beta, temperature):
    """Textbook float64 formula on probabilities: [..., V] -> [...]. Differentiable."""
    s = torch.softmax(student_logits.double() / temperature, dim=-1)
    t = torch.softmax(teacher_logits.double() / temperature, dim=-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = (1 - beta) * s + beta * t
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def random_logits(*shape, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("beta,temperature", GRID)
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 31)])
def test_token_loss_matches_float64_reference(shape, beta, temperature):
    student64 = random_logits(*shape, seed=1)
    teacher64 = random_logits(*shape, seed=2)
    student = student64.float().requires_grad_()
    teacher = teacher64.float().requires_grad_()
    ref_student = student64.clone().requires_grad_()
    ref_teacher = teacher64.clone().requires_grad_()

    loss = generalized_jsd_token_loss(student, teacher, beta=beta, temperature=temperature)
    ref = reference_jsd(ref_student, ref_teacher, beta, temperature)
    assert loss.shape == shape[:-1]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)

    # A non-uniform upstream gradient so a wrong per-row term cannot hide in a sum.
    weights = random_logits(*shape[:-1], seed=3)
    got = grads((loss.double() * weights).sum(), (student, teacher))
    want = grads((ref * weights).sum(), (ref_student, ref_teacher))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta,temperature", GRID)
def test_token_loss_upcasts_bf16(beta, temperature):
    student = random_logits(9, 40, seed=4).bfloat16()
    teacher = random_logits(9, 40, seed=5).bfloat16()
    loss = generalized_jsd_token_loss(student, teacher, beta=beta, temperature=temperature)
    assert loss.dtype == torch.float32
    # Same bf16 values, float64 math: only float32 rounding may separate them.
    torch.testing.assert_close(
        loss.double(), reference_jsd(student, teacher, beta, temperature), rtol=1e-5, atol=1e-6
    )


def test_endpoints_are_forward_and_reverse_kl():
    student = random_logits(6, 20, seed=6)
    teacher = random_logits(6, 20, seed=7)
    s = torch.log_softmax(student, -1)
    t = torch.log_softmax(teacher, -1)
    forward_kl = (t.exp() * (t - s)).sum(-1)
    reverse_kl = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(generalized_jsd_token_loss(student, teacher, beta=0.0), forward_kl)
    torch.testing.assert_close(generalized_jsd_token_loss(student, teacher, beta=1.0), reverse_kl)
    assert not torch.allclose(forward_kl, reverse_kl, rtol=1e-2)
    # The generalized JSD itself vanishes towards the ends: the endpoints are a definition, not a limit.
    for beta in (1e-7, 1 - 1e-7):
        assert generalized_jsd_token_loss(student, teacher, beta=beta).abs().max() < 1e-4


@pytest.mark.parametrize("beta,temperature", GRID)
def test_nonnegative_and_zero_for_equal_logits(beta, temperature):
    student = random_logits(8, 25, seed=8)
    teacher = random_logits(8, 25, seed=9)
    loss = generalized_jsd_token_loss(student.float(), teacher.float(), beta=beta, temperature=temperature)
    assert (loss > 0).all()

    same = student.float().requires_grad_()
    loss_same = generalized_jsd_token_loss(same, student.float(), beta=beta, temperature=temperature)
    assert loss_same.abs().max() < 1e-6
    (grad,) = grads(loss_same.sum(), (same,))
    assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("beta", BETAS)
def test_masked_vocabulary_entries_stay_finite(beta):
    """-inf logits (a vocabulary entry masked on both sides) must not turn into NaN."""
    student = random_logits(4, 12, seed=10)
    teacher = random_logits(4, 12, seed=11)
    masked = torch.zeros(12, dtype=torch.bool)
    masked[[2, 7]] = True
    student_inf = student.masked_fill(masked, float("-inf")).float().requires_grad_()
    teacher_inf = teacher.masked_fill(masked, float("-inf")).float()

    loss = generalized_jsd_token_loss(student_inf, teacher_inf, beta=beta)
    want = reference_jsd(student[:, ~masked], teacher[:, ~masked], beta, 1.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = grads(loss.sum(), (student_inf,))
    assert torch.isfinite(grad).all()


def test_token_loss_rejects_bad_arguments():
    logits = random_logits(2, 5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_token_loss(logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_token_loss(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd_token_loss(logits, random_logits(2, 6))


def make_batch(batch=3, length=6, vocab=17, seed=20):
    student = random_logits(batch, length, vocab, seed=seed).float()
    teacher = random_logits(batch, length, vocab, seed=seed + 1).float()
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 2))
    labels[0, :2] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    labels[2, 3] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta,temperature", GRID)
def test_loss_is_mean_over_scored_positions(beta, temperature):
    student, teacher, labels = make_batch()
    student.requires_grad_()
    loss = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    scored = labels != -100
    want = reference_jsd(student.detach()[scored], teacher[scored], beta, temperature).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)

    (grad,) = grads(loss, (student,))
    assert (grad[~scored] == 0).all()
    assert (grad[scored].abs().sum(-1) > 0).all()


def test_unscored_positions_do_not_change_the_loss():
    student, teacher, labels = make_batch()
    loss = generalized_jsd_loss(student, teacher, labels)
    scrambled = student.clone()
    scrambled[labels == -100] = random_logits(int((labels == -100).sum()), 17, seed=99).float()
    assert torch.equal(generalized_jsd_loss(scrambled, teacher, labels), loss)
    scrambled[labels != -100] += 1.0 * torch.arange(17).float()
    assert generalized_jsd_loss(scrambled, teacher, labels) != loss


def test_no_labels_scores_every_position_and_2d_input():
    student, teacher, _ = make_batch()
    loss = generalized_jsd_loss(student, teacher)
    torch.testing.assert_close(loss.double(), reference_jsd(student, teacher, 0.5, 1.0).mean(), rtol=1e-5, atol=1e-6)
    flat = generalized_jsd_loss(student.reshape(-1, 17), teacher.reshape(-1, 17))
    torch.testing.assert_close(flat, loss)


def test_nothing_scored_gives_zero_with_a_gradient_path():
    student, teacher, labels = make_batch()
    student.requires_grad_()
    loss = generalized_jsd_loss(student, teacher, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and (student.grad == 0).all()


def test_labels_must_match_positions():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="labels"):
        generalized_jsd_loss(student, teacher, labels[:, 1:])


# ---- against the reference implementation, trl.experimental.gold ----------------------------


@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gold_trainer = pytest.importorskip("trl.experimental.gold.gold_trainer")
    return gold_trainer.GOLDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta,temperature", GRID)
def test_matches_trl_with_labels(trl_jsd, beta, temperature):
    student, teacher, labels = make_batch(seed=30)
    ours_in = student.clone().requires_grad_()
    trl_in = student.clone().requires_grad_()
    ours = generalized_jsd_loss(ours_in, teacher, labels, beta=beta, temperature=temperature)
    theirs = trl_jsd(trl_in, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(ours, (ours_in,))[0], grads(theirs, (trl_in,))[0], rtol=1e-4, atol=1e-7)


def test_trl_differs_without_labels_on_3d_input(trl_jsd):
    # Deliberate difference: with labels=None, TRL's "batchmean" divides the total by
    # jsd.size(0) of the unreduced [B, L, V] tensor, i.e. by the batch size B, giving a
    # per-sequence sum; ours is a per-token mean over all B * L positions, as with labels.
    student, teacher, _ = make_batch(batch=3, length=6, seed=40)
    ours = generalized_jsd_loss(student, teacher)
    theirs = trl_jsd(student, teacher)
    torch.testing.assert_close(theirs, ours * 6, rtol=1e-5, atol=1e-6)
    # On [N, V] input both are per-token means.
    torch.testing.assert_close(trl_jsd(student.reshape(-1, 17), teacher.reshape(-1, 17)), ours, rtol=1e-5, atol=1e-6)


def test_trl_differs_on_bf16_precision(trl_jsd):
    # Deliberate difference: TRL computes (and returns) in the logits' dtype; ours upcasts
    # to float32 first, so bf16 logits lose nothing beyond their own rounding.
    student, teacher, labels = make_batch(vocab=17, seed=50)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    want = reference_jsd(student, teacher, 0.5, 1.0)[labels != -100].mean()
    ours = generalized_jsd_loss(student, teacher, labels)
    theirs = trl_jsd(student, teacher, labels=labels)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)
    assert (theirs.double() - want).abs() > (ours.double() - want).abs()


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_trl_differs_on_masked_vocabulary(trl_jsd, beta):
    # Deliberate difference: TRL's F.kl_div evaluates 0 * (-inf) = NaN where a vocabulary
    # entry is -inf on both sides; ours treats 0 * log(0 / q) as 0.
    student, teacher, labels = make_batch(seed=60)
    student[..., 3] = float("-inf")
    teacher[..., 3] = float("-inf")
    assert torch.isnan(trl_jsd(student, teacher, labels=labels, beta=beta))
    assert torch.isfinite(generalized_jsd_loss(student, teacher, labels, beta=beta))
