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

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


BLOCK = 4096  # vocabulary entries per loop step of a row
NUM_WARPS = 8  # best of the sweep in benchmarks/bench_triton_jsd.py on an H200


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _jsd_rows_kernel(
        s_ptr, t_ptr, loss_ptr, V, stride_s, stride_t,
        inv_tau, beta, grad_scale,
        MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # MODE 0: beta == 0 (forward KL(T || S)); 1: beta == 1 (reverse KL(S || T)); 2: between.
        # Transcendentals are the cost: one exp per element and logits row for the
        # log-sum-exp, then exp(ls), exp(lt) and one log for the mixture per pass.
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)

        # pass 1: log-sum-exp of both rows (block maxima, one rescale per block)
        m_s = float("-inf")
        m_t = float("-inf")
        z_s = 0.0
        z_t = 0.0
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
            new_s = tl.maximum(m_s, tl.max(s, 0))
            new_t = tl.maximum(m_t, tl.max(t, 0))
            z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
            z_t = z_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), 0)
            m_s = new_s
            m_t = new_t
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)

        # pass 2: the divergence (and the row sum the gradient needs)
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
                pm = (1.0 - beta) * ps + beta * pt
                lm = tl.log(pm)
                live = mask & (pm > 0.0)  # both probabilities underflowed: no contribution
                acc_a += tl.where(live, pt * (lt - lm), 0.0)  # KL(T || M)
                acc_b += tl.where(live, ps * (ls - lm), 0.0)  # KL(S || M)
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
                pm = (1.0 - beta) * ps + beta * tl.exp(lt)
                grad = tl.where(ps > 0.0, ps * ((ls - tl.log(pm)) - kl_b) * grad_scale, 0.0)
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
        inv_tau, beta, scale,
        MODE=mode, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return loss
