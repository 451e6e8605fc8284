"""Generalized JSD from hidden states and lm_head weights, without full ``[tokens, vocab]`` logits.

Logits for a 150k vocabulary cost 0.6 MB per token and model in float32, more than the rest
of a small student's activations. Here the tokens are processed ``chunk_size`` rows at a
time: per chunk, student and teacher logits are computed, the loss and the closed-form
gradient with respect to the student logits are taken in float32, and that gradient is
pushed through the lm_head at once (into hidden, weight and bias gradients). Only the
gradients survive the chunk, so backward just scales them by ``grad_output``. On CUDA the
per-chunk elementwise work is fused by torch.compile; on CPU it runs eagerly, in place.

Closed-form gradient with respect to the student logits z (s = log_softmax(z / tau), S = e^s,
t and T the teacher's, m = log M, M = (1 - beta) S + beta T), per row:

- beta = 0, KL(T||S):            dL/dz = (S - T) / tau
- beta = 1, KL(S||T):            dL/dz = S (s - t - L) / tau, L the row's loss
- 0 < beta < 1, the generalized JSD: dL/dz = (1 - beta) S (s - m - KL(S||M)) / tau

(the teacher terms of the JSD drop out of the gradient because sum_j dM_j = 0 along a
softmax direction). The tests check this against autograd on the plain loss.
"""

from __future__ import annotations

import math
import warnings

import torch

from axolotl_gold.losses.jsd import _check_beta_temperature, _compute_dtype


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    z = logits.to(dtype)
    if temperature != 1.0:
        # Eager: in place, as z is a fresh upcast or the chunk's own temporary logits.
        # Compiled: out of place, which fuses anyway and avoids writing back a mutated input.
        z = z / temperature if torch.compiler.is_compiling() else z.div_(temperature)
    return torch.log_softmax(z, dim=-1)


def _jsd_rows_and_logit_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    temperature: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss ``[n]`` (nats) and, if asked, dL/d(student logits) ``[n, V]``.

    ``s`` and ``t`` are the student and teacher log-probabilities ``[n, V]`` at temperature tau,
    both in the compute dtype; they are consumed (overwritten in place). Log-probabilities
    must be finite. Works in at most four ``[n, V]`` buffers.
    """
    inv_tau = 1.0 / temperature

    if beta == 0.0:
        diff = t - s
        teacher_probs = t.exp_()
        loss_rows = diff.mul_(teacher_probs).sum(-1)
        del diff
        grad = s.exp_().sub_(teacher_probs).mul_(inv_tau) if need_grad else None
        return loss_rows, grad

    if beta == 1.0:
        diff = s - t
        del t
        student_probs = s.exp_()
        terms = diff.mul_(student_probs)
        loss_rows = terms.sum(-1)
        if not need_grad:
            return loss_rows, None
        # S (s - t) - S L, reusing the buffer that already holds S (s - t).
        grad = terms.addcmul_(student_probs, loss_rows.unsqueeze(-1), value=-1.0).mul_(inv_tau)
        return loss_rows, grad

    mixture = s + math.log1p(-beta)
    scratch = t + math.log(beta)
    torch.logaddexp(mixture, scratch, out=mixture)

    torch.sub(t, mixture, out=scratch)
    kl_teacher = scratch.mul_(t.exp_()).sum(-1)
    del t

    torch.sub(s, mixture, out=scratch)
    del mixture
    student_probs = s.exp_()
    terms = scratch.mul_(student_probs)
    kl_student = terms.sum(-1)
    loss_rows = beta * kl_teacher + (1.0 - beta) * kl_student
    if not need_grad:
        return loss_rows, None
    grad = terms.addcmul_(student_probs, kl_student.unsqueeze(-1), value=-1.0).mul_((1.0 - beta) * inv_tau)
    return loss_rows, grad


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    hidden = hidden.to(weight.dtype)
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias.to(weight.dtype), hidden, weight.t())


def _chunk_step(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    beta, temperature, need_grad, need_bias, compute_dtype,
):
    """One chunk: (loss sum, dL/d(student logits) ``[n, V]`` in the weight's dtype, its column sum
    ``[V]`` in the compute dtype for the bias); the gradients are None when not needed."""
    # Nested calls, so in eager mode each raw logits tensor dies once its log-softmax exists.
    s = _log_softmax(_linear(student_hidden, student_weight, student_bias), temperature, compute_dtype)
    t = _log_softmax(_linear(teacher_hidden, teacher_weight, teacher_bias), temperature, compute_dtype)
    loss_rows, grad = _jsd_rows_and_logit_grad(s, t, beta, temperature, need_grad)
    del s, t
    if not need_grad:
        return loss_rows.sum(), None, None
    bias_grad = grad.sum(0) if need_bias else None
    return loss_rows.sum(), grad.to(student_weight.dtype), bias_grad


# On CUDA the ~10 elementwise passes over each [chunk, V] float32 block cost far more than the
# matmuls; torch.compile fuses them (as liger does). Set to False to force eager mode.
COMPILE_ON_CUDA = True
_compiled_chunk_step = None


def _step_for(device: torch.device):
    global _compiled_chunk_step
    if device.type != "cuda" or not COMPILE_ON_CUDA:
        return _chunk_step
    if _compiled_chunk_step is None:
        _compiled_chunk_step = torch.compile(_chunk_step)
    return _compiled_chunk_step


def _run_step(device, *args):
    global COMPILE_ON_CUDA
    step = _step_for(device)
    if step is _chunk_step:
        return step(*args)
    try:
        return step(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a broken compiler must not stop training
        warnings.warn(f"torch.compile of the chunked JSD failed ({error!r}); using eager mode.", stacklevel=3)
        COMPILE_ON_CUDA = False
        return _chunk_step(*args)


# On CUDA without head biases, a Triton kernel does the per-chunk divergence and logit
# gradient in three passes over the logits (``triton_jsd.py``). False: the compiled tensor
# version above.
USE_TRITON = True


def _use_triton(device, student_bias, teacher_bias) -> bool:
    from axolotl_gold.losses import triton_jsd

    return USE_TRITON and student_bias is None and teacher_bias is None and triton_jsd.available(device)


# With the kernel, the logit gradients of this many consecutive chunks are kept and pushed
# through the lm_head by one pair of matmuls: half the passes over the float32 weight-gradient
# accumulator (each one reads and writes 4 bytes per lm_head entry) for one more [chunk, V]
# buffer. 1: a pair of matmuls per chunk.
MATMUL_GROUP = 2


def _triton_step(hidden_chunk, student_weight, teacher_hidden, teacher_weight, beta, temperature, out=None):
    """(loss sum, dL/d(student logits) in the weight's dtype, None): the kernel overwrites the
    student's logits (in ``out`` if given) with their gradient, so a chunk holds two ``[n, V]``
    buffers."""
    from axolotl_gold.losses.triton_jsd import jsd_rows_and_grad_

    logits = torch.matmul(hidden_chunk, student_weight.t(), out=out)
    teacher_logits = teacher_hidden.to(teacher_weight.dtype) @ teacher_weight.t()
    rows = jsd_rows_and_grad_(logits, teacher_logits, beta, temperature)
    return rows.sum(), logits, None


_mixed_addmm_works = True


def _accumulate_weight_grad(
    grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor, first: bool
) -> None:
    """grad_weight (float32 [V, H], or the operands' dtype) += grad_logits.T @ hidden, the operands maybe bf16;
    ``first``: grad_weight is uninitialized, so it is overwritten (no zero-fill pass)."""
    global _mixed_addmm_works
    beta = 0.0 if first else 1.0  # beta 0: the old contents are not read (NaNs included)
    if grad_logits.dtype == grad_weight.dtype:
        torch.addmm(grad_weight, grad_logits.t(), hidden, beta=beta, out=grad_weight)
        return
    if grad_weight.is_cuda and _mixed_addmm_works:
        # cuBLAS can add a bf16 product into a float32 output directly, saving a [V, H]
        # temporary and a pass over it per chunk; older torch builds lack out_dtype.
        try:
            torch.addmm(
                grad_weight, grad_logits.t(), hidden, beta=beta, out_dtype=grad_weight.dtype, out=grad_weight
            )
            return
        except (TypeError, RuntimeError):
            _mixed_addmm_works = False
    if not grad_weight.is_cuda:  # as cuBLAS does it: products of bf16 operands summed in float32
        grad_logits, hidden = grad_logits.to(grad_weight.dtype), hidden.to(grad_weight.dtype)
    product = grad_logits.t() @ hidden
    if first:
        grad_weight.copy_(product)
    else:
        grad_weight += product


class _ChunkedJSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        beta,
        temperature,
        chunk_size,
        grad_enabled,
        compute_dtype,
    ):
        # needs_input_grad ignores no_grad mode, so the caller says whether grads can be used.
        need_hidden, need_weight, need_bias = (
            ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        )
        need_grad = need_hidden or need_weight or need_bias
        num_tokens = student_hidden.shape[0]
        device = student_hidden.device
        # the gradients go back in the inputs' own dtypes (a float32 master head under bf16
        # autocast gets its float32 accumulator, never rounded to bf16 on the way)
        ctx.grad_dtypes = tuple(
            None if p is None else p.dtype for p in (student_hidden, student_weight, student_bias)
        )
        master_dtype = student_weight.dtype
        student_weight, student_bias = (head_in_dtype(p, compute_dtype) for p in (student_weight, student_bias))

        acc_dtype = _compute_dtype(student_weight.dtype)
        loss = torch.zeros((), dtype=acc_dtype, device=device)
        grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
        kernel = _use_triton(device, student_bias, teacher_bias)
        group = MATMUL_GROUP if kernel and need_grad and num_tokens > chunk_size else 1
        # Float32 accumulator when the weight gradient is a sum of several products: summing
        # bf16 products in bf16 loses the small ones. One product (all tokens in one group)
        # is written in the weight's dtype directly, as autograd on the plain loss does
        # (cuBLAS accumulates in float32 inside the product).
        one_product = num_tokens <= group * chunk_size
        grad_weight = (
            torch.empty(student_weight.shape, dtype=master_dtype if one_product else acc_dtype, device=device)
            if need_weight
            else None
        )
        if need_weight and num_tokens == 0:
            grad_weight.zero_()
        grad_bias = torch.zeros(student_weight.shape[0], dtype=acc_dtype, device=device) if need_bias else None

        held = None  # [group * chunk_size, V]: the logit gradients of rows group_start..start
        group_start = 0
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            hidden_chunk = student_hidden[start:end].to(student_weight.dtype)
            if kernel:
                if group > 1 and held is None:  # as many rows as the group will hold, not more
                    rows = min(group * chunk_size, num_tokens)
                    held = torch.empty(rows, student_weight.shape[0], dtype=student_weight.dtype, device=device)
                out = None if held is None else held[start - group_start : end - group_start]
                chunk_loss, grad_logits, chunk_bias_grad = _triton_step(
                    hidden_chunk, student_weight, teacher_hidden[start:end], teacher_weight, beta, temperature,
                    out=out,
                )
            else:
                chunk_loss, grad_logits, chunk_bias_grad = _run_step(
                    device, hidden_chunk, student_weight, student_bias, teacher_hidden[start:end],
                    teacher_weight, teacher_bias, beta, temperature, need_grad, need_bias, acc_dtype,
                )
            loss += chunk_loss
            if not need_grad:
                continue
            if need_bias:
                grad_bias += chunk_bias_grad
            if held is not None:
                if end - group_start < held.shape[0] and end < num_tokens:
                    continue  # room for another chunk
                grad_logits = held[: end - group_start]
            if need_hidden:
                grad_hidden[group_start:end] = grad_logits @ student_weight
            if need_weight:
                hidden_rows = student_hidden[group_start:end].to(student_weight.dtype)
                _accumulate_weight_grad(grad_weight, grad_logits, hidden_rows, first=group_start == 0)
            group_start = end
            del grad_logits

        # The float32 accumulators are cast to the parameters' dtypes in backward, by the same
        # pass that scales them by grad_output (one read of the accumulator, one write), not
        # by a cast here and a scaling there (a second pass over the largest gradient). Until
        # backward this holds 4 bytes per lm_head entry instead of 2; the peak is unchanged,
        # as a cast here would hold the accumulator and its copy together for a moment too.
        # A float32 parameter gets its accumulator itself, scaled in place (``_scaled``).
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:  # the version check of a buffer the first backward scaled
            raise RuntimeError(
                "the fused JSD's backward runs once per forward (it scales the gradients its forward "
                "formed in place): compute the loss again instead of a second backward(retain_graph=True)"
            ) from error
        return (*_scaled(saved, ctx.grad_dtypes, grad_output), *([None] * 8))


def head_in_dtype(param: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``param`` as the head's matmuls use it: cast to ``dtype`` (None: as it is). No autograd
    edge: the loss returns the parameter's gradient itself, in the parameter's dtype."""
    if param is None or dtype is None or param.dtype == dtype:
        return param
    return param.detach().to(dtype)


def _scaled(grads, dtypes, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """Each gradient the forward formed, times ``grad_output``, in its parameter's dtype: in
    place where the dtypes agree (the buffer is the forward's, used once: no second [V, H]
    buffer, and a float32 accumulator reaches a float32 parameter unrounded), else by one
    pass that scales and casts."""
    out = []
    for grad, dtype in zip(grads, dtypes):
        if grad is None:
            out.append(None)
        elif grad.dtype == dtype:
            out.append(grad.mul_(grad_output.to(grad.dtype)))
        else:
            out.append(torch.mul(grad, grad_output.to(grad.dtype), out=torch.empty_like(grad, dtype=dtype)))
    return out


def _flatten_and_check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias):
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student and teacher must score the same tokens, got {student_hidden.shape[0]} "
            f"and {teacher_hidden.shape[0]} rows."
        )
    if student_weight.shape[1] != student_hidden.shape[1] or teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(
            f"lm_head weights must be [vocab, hidden]: student {tuple(student_weight.shape)} for hidden "
            f"{student_hidden.shape[1]}, teacher {tuple(teacher_weight.shape)} for hidden {teacher_hidden.shape[1]}."
        )
    # Padding or resizing one side would score a different distribution than either model's.
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"JSD needs one shared vocabulary, but the student lm_head has {student_weight.shape[0]} rows and "
            f"the teacher's {teacher_weight.shape[0]}; use the ULD loss for different tokenizers."
        )
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != (student_weight.shape[0],):
            raise ValueError(f"{name} must be [vocab={student_weight.shape[0]}], got {tuple(bias.shape)}.")
    return student_hidden, teacher_hidden


def chunked_jsd_loss_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum over tokens of the generalized JSD, computed ``chunk_size`` tokens at a time.

    Args:
        student_hidden: ``[N, H]`` final hidden states of the scored tokens (select scored rows
            first; every row counts). Leading dims are flattened.
        student_weight: ``[V, H]`` student lm_head; its gradient is skipped when it does not
            require grad (a frozen lm_head under LoRA).
        teacher_hidden: ``[N, Ht]``; never receives a gradient.
        teacher_weight: ``[V, Ht]``; never receives a gradient.
        beta, temperature: as in ``generalized_jsd_token_loss``.
        chunk_size: rows per chunk; peak extra memory is about 4 x chunk_size x V float32.
        student_bias, teacher_bias: optional ``[V]``.
        compute_dtype: the dtype the student head's matmuls run in (autocast's for a float32
            head under bf16 autocast: ``scoring.forward.head_compute_dtype``); None: the
            weight's own. The weight and bias gradients come back in their own dtypes, the
            weight's accumulated in float32 throughout.

    Returns:
        Float32 scalar (float64 for a float64 lm_head): the SUM of per-token divergences in
        nats over the N tokens (divide by the scored-token count of the whole optimizer window
        outside, so gradients do not depend on how the window is split).
    """
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    student_hidden, teacher_hidden = _flatten_and_check(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias
    )
    return _ChunkedJSDFunction.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        float(beta),
        float(temperature),
        int(chunk_size),
        torch.is_grad_enabled(),
        compute_dtype,
    )
