"""A Triton kernel for one chunk of the fused JSD: logits in, row losses and logit grads out.

Given the student's and the teacher's logits of a chunk (``[n, V]``, bf16 or fp16 as
the matmuls wrote them), one program per row makes three passes over the vocabulary
in fp32:

1. the log-sum-exp of both rows (online max and sum);
2. the divergence terms (``KL(T || M)`` and ``KL(S || M)`` with ``M`` the beta mixture);
3. dL/d(student logits), written over the student's logits in place.

That is three reads of each logits row and one write, against the roughly ten
elementwise passes (and fp32 temporaries) of the tensor version; the matmuls around
it are unchanged. CUDA only; ``chunked.py`` falls back to the compiled tensor
version where Triton is missing or the head has a bias.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _jsd_rows_kernel(
        s_ptr, t_ptr, loss_ptr, V, stride_s, stride_t,
        inv_tau, log_beta, log_1m_beta, beta, grad_scale,
        MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # MODE 0: beta == 0 (forward KL(T || S)); 1: beta == 1 (reverse KL(S || T)); 2: between
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)

        # pass 1: log-sum-exp of both rows
        # a finite floor: lanes that have seen only padding stay exact (exp(-inf - m) = 0)
        m_s = tl.full([BLOCK], -1e30, tl.float32)
        m_t = tl.full([BLOCK], -1e30, tl.float32)
        z_s = tl.zeros([BLOCK], tl.float32)
        z_t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
            new_s = tl.maximum(m_s, s)
            new_t = tl.maximum(m_t, t)
            z_s = z_s * tl.exp(m_s - new_s) + tl.exp(s - new_s)
            z_t = z_t * tl.exp(m_t - new_t) + tl.exp(t - new_t)
            m_s = new_s
            m_t = new_t
        ms = tl.max(m_s, 0)
        mt = tl.max(m_t, 0)
        lse_s = ms + tl.log(tl.sum(z_s * tl.exp(m_s - ms), 0))
        lse_t = mt + tl.log(tl.sum(z_t * tl.exp(m_t - mt), 0))

        # pass 2: the divergence (and, for MODE 1 and 2, the row sum the gradient needs)
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            ls = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_s
            lt = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_t
            ps = tl.exp(ls)
            pt = tl.exp(lt)
            if MODE == 0:
                acc_a += tl.where(mask, pt * (lt - ls), 0.0)
            elif MODE == 1:
                acc_a += tl.where(mask, ps * (ls - lt), 0.0)
            else:
                a = ls + log_1m_beta
                b = lt + log_beta
                hi = tl.maximum(a, b)
                lm = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                acc_a += tl.where(mask, pt * (lt - lm), 0.0)  # KL(T || M)
                acc_b += tl.where(mask, ps * (ls - lm), 0.0)  # KL(S || M)
        kl_a = tl.sum(acc_a, 0)
        kl_b = tl.sum(acc_b, 0)
        if MODE == 2:
            tl.store(loss_ptr + row, beta * kl_a + (1.0 - beta) * kl_b)
        else:
            tl.store(loss_ptr + row, kl_a)

        # pass 3: dL/d(student logits), over the student's logits
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            ls = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_s
            lt = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_t
            ps = tl.exp(ls)
            if MODE == 0:
                grad = (ps - tl.exp(lt)) * grad_scale
            elif MODE == 1:
                grad = ps * ((ls - lt) - kl_a) * grad_scale
            else:
                a = ls + log_1m_beta
                b = lt + log_beta
                hi = tl.maximum(a, b)
                lm = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                grad = ps * ((ls - lm) - kl_b) * grad_scale
            tl.store(s_row + idx, grad.to(s_ptr.dtype.element_ty), mask=mask)


def jsd_rows_and_grad_(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """Row losses ``[n]`` (fp32); ``student_logits`` is overwritten with dL/d(logits)."""
    n, vocab = student_logits.shape
    if student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    loss = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    if n == 0:
        return loss
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    inv_tau = 1.0 / temperature
    scale = inv_tau if mode != 2 else (1.0 - beta) * inv_tau
    _jsd_rows_kernel[(n,)](
        student_logits, teacher_logits, loss, vocab, student_logits.stride(0), teacher_logits.stride(0),
        inv_tau,
        math.log(beta) if 0.0 < beta else 0.0,
        math.log1p(-beta) if beta < 1.0 else 0.0,
        beta, scale,
        MODE=mode, BLOCK=4096, num_warps=16,
    )
    return loss
