"""A Triton kernel for one chunk of the fused JSD: logits in, row losses and logit grads out.

Given the student's and the teacher's logits of a chunk (``[n, V]``, bf16 or fp16 as
the matmuls wrote them), three kernels make three passes over the vocabulary in fp32,
each row split over ``SPLITS`` programs whose partial sums the next kernel combines:

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


BLOCK = 4096  # vocabulary entries per loop step
NUM_WARPS = 8
SPLITS = 4  # programs per row (a power of two)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _lse_partials_kernel(
        s_ptr, t_ptr, part_ptr, V, stride_s, stride_t, span, inv_tau,
        SPLITS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Pass 1 on one split of a row: (max, sum of exp) of both rows' scaled logits."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        m_s = float("-inf")
        m_t = float("-inf")
        z_s = 0.0
        z_t = 0.0
        lo = split * span
        for start in range(lo, lo + span, BLOCK):
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
        out = part_ptr + (row * SPLITS + split) * 4
        tl.store(out, m_s)
        tl.store(out + 1, z_s)
        tl.store(out + 2, m_t)
        tl.store(out + 3, z_t)

    @triton.jit
    def _row_lse(part_ptr, row, SPLITS: tl.constexpr):
        """Combine a row's split partials into the two log-sum-exps."""
        base = part_ptr + row * SPLITS * 4 + tl.arange(0, SPLITS) * 4
        m_s = tl.load(base)
        z_s = tl.load(base + 1)
        m_t = tl.load(base + 2)
        z_t = tl.load(base + 3)
        ms = tl.max(m_s, 0)
        mt = tl.max(m_t, 0)
        lse_s = ms + tl.log(tl.sum(tl.where(z_s > 0, z_s * tl.exp(m_s - ms), 0.0), 0))
        lse_t = mt + tl.log(tl.sum(tl.where(z_t > 0, z_t * tl.exp(m_t - mt), 0.0), 0))
        return lse_s, lse_t

    @triton.jit
    def _kl_partials_kernel(
        s_ptr, t_ptr, part_ptr, kl_ptr, V, stride_s, stride_t, span, inv_tau, beta,
        MODE: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Pass 2 on one split: the divergence terms (MODE 0: beta 0, 1: beta 1, 2: between)."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        lse_s, lse_t = _row_lse(part_ptr, row, SPLITS)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        lo = split * span
        for start in range(lo, lo + span, BLOCK):
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
        out = kl_ptr + (row * SPLITS + split) * 2
        tl.store(out, tl.sum(acc_a, 0))
        tl.store(out + 1, tl.sum(acc_b, 0))

    @triton.jit
    def _grad_kernel(
        s_ptr, t_ptr, part_ptr, kl_ptr, loss_ptr, V, stride_s, stride_t, span, inv_tau, beta, grad_scale,
        MODE: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Pass 3 on one split: dL/d(student logits) over the student's logits; split 0
        also writes the row's loss."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        lse_s, lse_t = _row_lse(part_ptr, row, SPLITS)
        kl_base = kl_ptr + row * SPLITS * 2 + tl.arange(0, SPLITS) * 2
        kl_a = tl.sum(tl.load(kl_base), 0)
        kl_b = tl.sum(tl.load(kl_base + 1), 0)
        if split == 0:
            if MODE == 2:
                tl.store(loss_ptr + row, beta * kl_a + (1.0 - beta) * kl_b)
            else:
                tl.store(loss_ptr + row, kl_a)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        lo = split * span
        for start in range(lo, lo + span, BLOCK):
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
    # each row in SPLITS programs (more of the GPU busy than one program per row)
    span = triton.cdiv(triton.cdiv(vocab, SPLITS), BLOCK) * BLOCK
    partials = torch.empty(n, SPLITS, 4, dtype=torch.float32, device=student_logits.device)
    kl = torch.empty(n, SPLITS, 2, dtype=torch.float32, device=student_logits.device)
    grid = (n, SPLITS)
    common = dict(SPLITS=SPLITS, BLOCK=BLOCK, num_warps=NUM_WARPS)
    s_stride, t_stride = student_logits.stride(0), teacher_logits.stride(0)
    _lse_partials_kernel[grid](student_logits, teacher_logits, partials, vocab, s_stride, t_stride, span,
                               inv_tau, **common)
    _kl_partials_kernel[grid](student_logits, teacher_logits, partials, kl, vocab, s_stride, t_stride, span,
                              inv_tau, beta, MODE=mode, **common)
    _grad_kernel[grid](student_logits, teacher_logits, partials, kl, loss, vocab, s_stride, t_stride, span,
                       inv_tau, beta, scale, MODE=mode, **common)
    return loss
