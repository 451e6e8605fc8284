"""The fused JSD with a choice of backend: ours (``chunked.py``) or liger-kernel's fused linear JSD.

Same arguments and the same result (the sum over tokens in nats) either way; ``"auto"``
picks liger only where it computes what ours does.
"""

from __future__ import annotations

from typing import Literal

import torch

from axolotl_gold.losses.chunked import _flatten_and_check, chunked_jsd_loss_sum
from axolotl_gold.losses.jsd import _check_beta_temperature

Backend = Literal["auto", "torch", "liger"]


def _liger_jsd_function():
    """Liger's fused-linear JSD autograd Function, or None where it cannot run.

    Importing liger pulls in triton, which may be missing or broken on CPU-only hosts.
    """
    try:
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return LigerFusedLinearJSDFunction


def _liger_jsd_loss_sum(
    student_hidden, student_weight, teacher_hidden, teacher_weight, beta, temperature, chunk_size,
    student_bias, teacher_bias,
):
    function = _liger_jsd_function()
    if function is None:
        raise RuntimeError("backend='liger' needs liger-kernel (and triton) importable.")
    num_tokens = student_hidden.shape[0]
    # What liger 0.8.1 computes, and how the arguments below map it onto our sum:
    # - beta: the same convention as ours (M = (1-beta) S + beta T, loss = beta KL(T||M) +
    #   (1-beta) KL(S||M), beta=0 forward KL(T||S), beta=1 reverse KL(S||T)); not mirrored.
    # - temperature: logits are divided by it before the softmax, no tau**2 factor; as ours.
    # - reduction: the JSD sum is divided by the number of labels != ignore_index (clamped to
    #   1), times weight_soft_loss, plus weight_hard_loss x a mean cross-entropy on the labels.
    #   All-zero labels make every row count, weight_soft_loss = N turns the mean back into a
    #   sum, and weight_hard_loss = 0 drops the cross-entropy (which liger still computes).
    # - precision: liger takes the softmax and JSD in the logits' dtype and accumulates the
    #   weight gradient in the weight's dtype; equal to ours only for float32 inputs.
    # - chunking: N // chunk_size chunks via torch.chunk, so chunks hold up to 2 x chunk_size
    #   rows; a frozen lm_head still gets its gradient computed (then dropped by autograd);
    #   a teacher vocabulary larger than the student's is zero-padded (we refuse it above).
    labels = torch.zeros(num_tokens, dtype=torch.long, device=student_hidden.device)
    return function.apply(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        0.0,  # weight_hard_loss
        float(num_tokens),  # weight_soft_loss
        float(beta),
        -100,  # ignore_index
        float(temperature),
        True,  # compiled
        int(chunk_size),
        False,  # return_soft_hard_loss
    )


def fused_jsd_loss_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: Backend = "auto",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``chunked_jsd_loss_sum`` with a choice of implementation; same arguments and result.

    Args:
        backend: ``"torch"`` is ``chunked_jsd_loss_sum``. ``"liger"`` is liger-kernel's
            fused linear JSD (CUDA, float32 scalar result of the same sum). ``"auto"`` picks
            liger only where it computes the same thing: CUDA, liger importable, float32
            student and teacher weights (liger computes the JSD in the logits' dtype, so in
            bf16 it is less precise than ours), and a trainable student lm_head (liger always
            computes the weight gradient, a wasted matmul per chunk under LoRA); else torch.
        compute_dtype: the dtype the student head computes in (``chunked_jsd_loss_sum``'s);
            a lower one than the weight's rules liger out under ``"auto"``.

    Returns:
        Float32 scalar, the sum over the N tokens in nats.
    """
    if backend not in ("auto", "torch", "liger"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'liger', got {backend!r}.")
    _check_beta_temperature(beta, temperature)
    student_hidden, teacher_hidden = _flatten_and_check(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias
    )
    if backend == "auto":
        use_liger = (
            student_hidden.is_cuda
            and student_hidden.shape[0] > 0
            and compute_dtype in (None, torch.float32)
            and student_weight.dtype == torch.float32
            and teacher_weight.dtype == torch.float32
            and student_weight.requires_grad
            and _liger_jsd_function() is not None
        )
        backend = "liger" if use_liger else "torch"
    if backend == "liger":
        if not student_hidden.is_cuda:
            raise RuntimeError("backend='liger' runs on CUDA tensors only; use backend='torch' on CPU.")
        if compute_dtype is not None:  # liger takes the head as it computes: cast (autograd casts back)
            student_weight, student_bias = (
                None if p is None else p.to(compute_dtype) for p in (student_weight, student_bias)
            )
        return _liger_jsd_loss_sum(
            student_hidden, student_weight, teacher_hidden, teacher_weight, beta, temperature, chunk_size,
            student_bias, teacher_bias,
        ).float()
    return chunked_jsd_loss_sum(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta, temperature=temperature,
        chunk_size=chunk_size, student_bias=student_bias, teacher_bias=teacher_bias, compute_dtype=compute_dtype,
    )
