"""Generalized Jensen-Shannon divergence between student and teacher next-token distributions.

With S, T the student and teacher softmax at temperature tau and M = (1 - beta) S + beta T,
the per-token loss is beta KL(T||M) + (1 - beta) KL(S||M). The generalized JSD vanishes at
both ends of beta, so the endpoints are defined separately: beta = 0 is forward KL(T||S) and
beta = 1 is reverse KL(S||T). Divergences are in nats. Like the reference, no tau**2 factor
is applied: the temperature only reshapes the distributions.

These functions materialize full ``[tokens, vocab]`` logits; ``chunked.py`` holds the
memory-lean path that starts from hidden states and the lm_head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs already are: bf16/fp16 softmax over 150k entries is too coarse."""
    return torch.promote_types(dtype, torch.float32)


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q), taken as 0 wherever p == 0.

    Masking the log-ratio (not the product) keeps both the value and the gradient free of NaN
    when a logit is -inf (a vocabulary entry masked out), where log p - log q is -inf - -inf.
    """
    p = p_log.exp()
    ratio = torch.where(p > 0, p_log - q_log, torch.zeros((), dtype=p_log.dtype, device=p_log.device))
    return p * ratio


def _jsd_from_log_probs(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return _kl_terms(teacher_log_probs, student_log_probs).sum(-1)
    if beta == 1.0:
        return _kl_terms(student_log_probs, teacher_log_probs).sum(-1)
    # log M by logaddexp rather than log((1-beta) S + beta T): the probabilities underflow to 0
    # for most of a large vocabulary, their logs do not. The clamp keeps an entry that is -inf
    # on both sides finite, since logaddexp's gradient there is exp(-inf - -inf) = NaN.
    floor = torch.finfo(student_log_probs.dtype).min / 2
    mixture_log_probs = torch.logaddexp(
        student_log_probs.clamp_min(floor) + math.log1p(-beta),
        teacher_log_probs.clamp_min(floor) + math.log(beta),
    )
    kl_teacher = _kl_terms(teacher_log_probs, mixture_log_probs).sum(-1)
    kl_student = _kl_terms(student_log_probs, mixture_log_probs).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def generalized_jsd_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalized JSD between two sets of logits over the same vocabulary.

    Args:
        student_logits: ``[N, V]`` (or ``[..., V]``), any float dtype; differentiable.
        teacher_logits: same shape as ``student_logits``.
        beta: mixture weight of the teacher in [0, 1]; 0 is forward KL(T||S), 1 reverse KL(S||T).
        temperature: softmax temperature tau > 0 applied to both sides.

    Returns:
        ``[N]`` (the leading shape of the inputs) divergences in nats, each >= 0, in float32
        (float64 for float64 inputs); low-precision inputs are upcast before the softmax.
    """
    _check_beta_temperature(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape (same vocabulary), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    compute_dtype = _compute_dtype(student_logits.dtype)
    student_log_probs = F.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=-1)
    return _jsd_from_log_probs(student_log_probs, teacher_log_probs, beta)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean generalized JSD over the scored positions.

    Args:
        student_logits: ``[B, L, V]`` or ``[N, V]``, any float dtype.
        teacher_logits: same shape as ``student_logits``.
        labels: ``[B, L]`` or ``[N]``, already aligned with the logits (no shift happens here);
            positions equal to -100 are not scored. ``None`` scores every position.
        beta: see ``generalized_jsd_token_loss``.
        temperature: see ``generalized_jsd_token_loss``.

    Returns:
        Scalar float32 (float64 for float64 inputs): the per-token mean in nats over scored
        positions (sum / count), or 0 with a gradient path to the student logits when no
        position is scored. For a window-wide mean across micro-batches, sum per-token losses
        instead and divide once by the window's scored-token count.
    """
    vocab = student_logits.shape[-1]
    student_flat = student_logits.reshape(-1, vocab)
    teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if labels is not None:
        if labels.numel() != student_flat.shape[0]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match the logits' positions "
                f"{tuple(student_logits.shape[:-1])}."
            )
        scored = labels.reshape(-1) != IGNORE_INDEX
        # Select before the softmax so prompt and padding rows cost nothing.
        student_flat = student_flat[scored]
        teacher_flat = teacher_flat[scored]
    per_token = generalized_jsd_token_loss(student_flat, teacher_flat, beta=beta, temperature=temperature)
    # An empty selection sums to 0 and still reaches the student logits, so backward works.
    return per_token.sum() / max(per_token.shape[0], 1)
