"""Generalized JSD against a teacher known only by its top-k log-probabilities plus a tail bucket.

A server we do not run (vLLM's OpenAI-compatible ``prompt_logprobs``) gives, per position, the
teacher's k most likely token ids and their log-probabilities, not the full distribution. Both
distributions are then collapsed onto the same k + 1 buckets: each listed id is a bucket of its
own, and the **tail bucket** holds everything else (the teacher's ``1 - sum of its top-k``, the
student's mass outside those ids, computed exactly from its full-vocabulary logits). The loss
is the generalized JSD of ``jsd.py`` (same beta convention and endpoints, no tau**2 factor)
between those two (k + 1)-bucket distributions.

What it means: the loss cannot see how the student spreads its tail mass, only how much of it
there is, so the gradient pushes the student's tail mass up or down **as a whole** (each tail
token in proportion to its own probability). With k = V the tail is empty and the loss is the
full-vocabulary JSD. ``benchmarks/bench_topk_tail.py`` measures the error against it.

Teacher ids: an id < 0 is padding, an id listed twice counts once (its first entry); vLLM
sends k + 1 entries where the scored token is outside the top-k, which is simply one more
bucket. Ids must be < ``vocab_size`` (the student's head rows compared).

Temperature: the student's logits are divided by tau before the softmax, as in ``jsd.py``. The
teacher's log-probabilities come at tau = 1; its listed entries are tempered exactly
(``p ** (1 / tau)``), its unknown tail is assumed spread evenly over the unlisted ids (then
renormalized). At tau = 1, the default, no assumption is made.

Chunked over positions: per chunk of rows the student's ``[n, V]`` logits (from hidden states
and the head, or given), the loss and its gradient with respect to those logits are computed
and pushed through the head at once; only the gradients survive the chunk.
"""

from __future__ import annotations

import math

import torch

from axolotl_gold.losses.jsd import _check_beta_temperature, _compute_dtype, _jsd_from_log_probs


# the smallest tail mass the teacher is given while some id is unlisted (see below)
TAIL_FLOOR = 1e-12


def _valid_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[n, K]`` bool: the entry is a real, first-listed id (not padding, not a repeat)."""
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"teacher token id {int(ids.max())} is outside the compared vocabulary of {vocab_size} "
            "ids: the teacher serves another vocabulary than the student's."
        )
    valid = ids >= 0
    if ids.shape[-1] > 1:
        sorted_ids, order = torch.sort(ids, dim=-1, stable=True)
        repeat = torch.zeros_like(valid)
        repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]  # stable: the first entry stays
        valid &= ~torch.empty_like(repeat).scatter_(1, order, repeat)
    return valid


def teacher_bucket_log_probs(
    logprobs: torch.Tensor, valid: torch.Tensor, vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """``[n, K + 1]`` float64 log-probabilities of the teacher's buckets (the tail last), -inf
    for invalid entries. The tail's mass is ``max(1 - listed, TAIL_FLOOR)`` while any id is
    unlisted, else 0; the buckets are renormalized."""
    lp = torch.where(valid, logprobs.to(torch.float64), torch.tensor(-math.inf, dtype=torch.float64, device=logprobs.device))
    listed = lp.exp().sum(-1)
    # A peaked teacher's top log-prob rounds to 0.0 in float32 (p > 1 - 6e-8): a tail of exactly
    # 0 would make reverse KL infinite wherever the student has tail mass, so it is floored.
    tail = torch.log1p(-listed.clamp(max=1.0 - TAIL_FLOOR))
    unlisted = vocab_size - valid.sum(-1).to(torch.float64)
    if temperature != 1.0:
        lp = lp / temperature
        # the tail's r spread evenly over its m ids: m * (r / m) ** (1 / tau)
        tail = tail / temperature + (1.0 - 1.0 / temperature) * unlisted.clamp(min=1.0).log()
    tail = torch.where(unlisted > 0, tail, -math.inf)
    buckets = torch.cat([lp, tail.unsqueeze(-1)], dim=-1)
    norm = torch.logsumexp(buckets, dim=-1, keepdim=True)
    return buckets - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))


def student_bucket_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[n, K + 1]`` log-probabilities of the student's buckets from its ``[n, V]`` logits
    (in their dtype; differentiable): the listed ids' log-probs, then the log of the mass
    outside them (a masked logsumexp, exact also when it is tiny); -inf where invalid."""
    n, vocab = logits.shape
    z = logits / temperature if temperature != 1.0 else logits
    norm = torch.logsumexp(z, dim=-1, keepdim=True)
    neg_inf = torch.tensor(-math.inf, dtype=z.dtype, device=z.device)
    listed = torch.where(valid, z.gather(1, ids.clamp(min=0)) - norm, neg_inf)
    # padding and repeats point at a spare column, so they never unmark a listed id
    in_top = torch.zeros((n, vocab + 1), dtype=torch.bool, device=z.device)
    in_top.scatter_(1, torch.where(valid, ids, vocab), True)
    in_top = in_top[:, :vocab]
    floor = torch.finfo(z.dtype).min / 2  # not -inf: an empty tail must not give NaN gradients
    tail = torch.logsumexp(torch.where(in_top, floor, z), dim=-1) - norm.squeeze(-1)
    tail = torch.where(in_top.all(-1), neg_inf, tail)
    return torch.cat([listed, tail.unsqueeze(-1)], dim=-1)


def topk_tail_token_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row loss ``[n]`` in nats from full ``[n, V]`` student logits (differentiable; holds
    several ``[n, V]`` buffers: ``topk_tail_loss_sum`` is the chunked path)."""
    _check_beta_temperature(beta, temperature)
    dtype = _compute_dtype(student_logits.dtype)
    vocab = student_logits.shape[-1]
    ids = teacher_ids.to(student_logits.device, torch.long)
    valid = _valid_ids(ids, vocab)
    t = teacher_bucket_log_probs(teacher_logprobs.to(student_logits.device), valid, vocab, temperature)
    s = student_bucket_log_probs(student_logits.to(dtype), ids, valid, temperature)
    return _jsd_from_log_probs(s, t.to(dtype), beta)


class _TopKTailFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, valid, teacher_buckets, weights, beta, temperature, chunk_size, grad_enabled):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3] if grad_enabled else (False,) * 3
        need_grad = need_hidden or need_weight or need_bias
        head_dtype = hidden.dtype if weight is None else weight.dtype
        dtype = _compute_dtype(head_dtype)
        device = hidden.device
        loss = torch.zeros((), dtype=dtype, device=device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=device) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            rows_h = hidden[start:end] if weight is None else hidden[start:end].to(weight.dtype)
            with torch.no_grad():
                logits = rows_h if weight is None else torch.nn.functional.linear(rows_h, weight, bias)
            logits = logits.to(dtype).detach().requires_grad_(need_grad)
            with torch.enable_grad():
                s = student_bucket_log_probs(logits, ids[start:end], valid[start:end], temperature)
                rows = _jsd_from_log_probs(s, teacher_buckets[start:end].to(dtype), beta)
                if weights is not None:
                    rows = rows * weights[start:end].to(dtype)
                chunk_loss = rows.sum()
                grad = torch.autograd.grad(chunk_loss, logits)[0] if need_grad else None
            loss += chunk_loss.detach()
            del s, rows, logits
            if grad is None:
                continue
            if need_bias:
                grad_bias += grad.sum(0)
            if weight is None:
                grad_hidden[start:end] = grad.to(hidden.dtype)
                continue
            grad = grad.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:end] = (grad @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad.t() @ rows_h).to(dtype)
        ctx.dtypes = tuple(None if p is None else p.dtype for p in (hidden, weight, bias))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = [
            None if g is None else (g * grad_output.to(g.dtype)).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return (*grads, *(None,) * 8)


def topk_tail_loss_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | None,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over positions of the top-k + tail generalized JSD, ``chunk_size`` rows at a time.

    Args:
        student_hidden: ``[..., H]`` final hidden states, or ``[..., V]`` logits when
            ``student_weight`` is None.
        student_weight: ``[V, H]`` student head (its gradient skipped when frozen), or None.
        teacher_ids: ``[..., K]`` integer ids (< 0: padding; repeats count once).
        teacher_logprobs: ``[..., K]`` the teacher's log-probabilities of those ids at tau = 1.
        beta, temperature: as in ``generalized_jsd_token_loss``.
        chunk_size: rows per chunk; at most one chunk of ``[chunk_size, V]`` logits (and
            their autograd buffers) exists at a time.
        student_bias: optional ``[V]``.
        mask: optional ``[...]`` bool; False rows contribute nothing (not even NaN inputs).
        weights: optional ``[...]`` per-row weights (repeat counts).

    Returns:
        Float32 scalar (float64 for float64 inputs): the SUM of the per-row divergences in nats.
    """
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    width = student_hidden.shape[-1]
    k = teacher_ids.shape[-1]
    if teacher_logprobs.shape != teacher_ids.shape or teacher_ids.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs {tuple(teacher_logprobs.shape)} must "
            f"be [..., K] over the student's positions {tuple(student_hidden.shape[:-1])}."
        )
    hidden = student_hidden.reshape(-1, width)
    ids = teacher_ids.reshape(-1, k).to(hidden.device, torch.long)
    logprobs = teacher_logprobs.reshape(-1, k).to(hidden.device)
    if weights is not None:
        weights = weights.reshape(-1).to(hidden.device)
    if mask is not None:
        keep = mask.reshape(-1).to(hidden.device, torch.bool)
        hidden, ids, logprobs = hidden[keep], ids[keep], logprobs[keep]
        weights = None if weights is None else weights[keep]
    if student_weight is not None and student_weight.shape[1] != width:
        raise ValueError(f"student head {tuple(student_weight.shape)} does not take hidden size {width}.")
    vocab = width if student_weight is None else student_weight.shape[0]
    valid = _valid_ids(ids, vocab)
    buckets = teacher_bucket_log_probs(logprobs, valid, vocab, temperature)
    return _TopKTailFunction.apply(
        hidden, student_weight, student_bias, ids, valid, buckets, weights,
        float(beta), float(temperature), int(chunk_size), torch.is_grad_enabled(),
    )
