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

Passes 2 and 3 were bound by arithmetic, not memory (timed pass by pass on an H200:
0.22 ms for pass 1, 0.36 for pass 2, 0.31 for pass 3 of a 1024 x 151,936 chunk, though
pass 3 also writes): so the work is in base 2 (``exp2``/``log2`` are the hardware's, and
``log2(e) / tau`` folds into the one multiply-add that normalizes a logit), full blocks
are loaded without masks (only the ragged last block is masked), and a mixture
probability that underflows is clamped rather than tested and selected.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


# Vocabulary entries per loop step of a row, and warps per row. On an H200 the kernel alone
# is fastest at (1024, 4) (benchmarks/bench_triton_jsd.py), the whole loss step at (2048, 8)
# (benchmarks/bench_jsd_loss.py --triton, 11.7 vs 12.2 ms), which is what counts.
BLOCK = 2048
NUM_WARPS = 8
LOG2E = 1.4426950408889634


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    _LN2 = tl.constexpr(0.6931471805599453)
    # Mixture probabilities below this count as this: log2 stays finite, so a term whose
    # weight underflowed to 0 contributes 0 (not 0 * inf); such terms are below 1e-28.
    _TINY = tl.constexpr(1.0e-30)

    @triton.jit
    def _log2_probs(s_row, t_row, idx, mask, c, lse2_s, lse2_t, MASKED: tl.constexpr):
        """Base-2 log-probabilities of a block of both rows (masked lanes: finite junk)."""
        if MASKED:
            s = tl.load(s_row + idx, mask=mask, other=0.0)
            t = tl.load(t_row + idx, mask=mask, other=0.0)
        else:
            s = tl.load(s_row + idx)
            t = tl.load(t_row + idx)
        return s.to(tl.float32) * c - lse2_s, t.to(tl.float32) * c - lse2_t

    @triton.jit
    def _kl_terms(ls, lt, beta, MODE: tl.constexpr):
        """Per-entry divergence terms in bits: (KL(T||M) or the only KL, KL(S||M))."""
        if MODE == 0:
            a = tl.exp2(lt) * (lt - ls)
            return a, a
        elif MODE == 1:
            a = tl.exp2(ls) * (ls - lt)
            return a, a
        else:
            ps = tl.exp2(ls)
            pt = tl.exp2(lt)
            lm = tl.log2(tl.maximum((1.0 - beta) * ps + beta * pt, _TINY))
            return pt * (lt - lm), ps * (ls - lm)

    @triton.jit
    def _logit_grad(ls, lt, beta, g_scale, g_shift, MODE: tl.constexpr):
        """dL/d(student logit) = p_s (g_scale * d - g_shift), d the log-ratio in bits
        (MODE 0: (p_s - p_t) * g_scale)."""
        ps = tl.exp2(ls)
        if MODE == 0:
            return (ps - tl.exp2(lt)) * g_scale
        elif MODE == 1:
            return ps * ((ls - lt) * g_scale - g_shift)
        else:
            lm = tl.log2(tl.maximum((1.0 - beta) * ps + beta * tl.exp2(lt), _TINY))
            return ps * ((ls - lm) * g_scale - g_shift)

    @triton.jit
    def _jsd_rows_kernel(
        s_ptr, t_ptr, loss_ptr, V, stride_s, stride_t,
        c, beta, grad_scale,
        MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # MODE 0: beta == 0 (forward KL(T || S)); 1: beta == 1 (reverse KL(S || T)); 2: between.
        # c = log2(e) / tau: a logit times c is its tempered value in bits.
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        full = V - V % BLOCK  # blocks before this one need no mask

        # pass 1: log-sum-exp of both rows in bits (block maxima, one rescale per block)
        m_s = float("-inf")
        m_t = float("-inf")
        z_s = 0.0
        z_t = 0.0
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * c
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * c
            new_s = tl.maximum(m_s, tl.max(s, 0))
            new_t = tl.maximum(m_t, tl.max(t, 0))
            z_s = z_s * tl.exp2(m_s - new_s) + tl.sum(tl.exp2(s - new_s), 0)
            z_t = z_t * tl.exp2(m_t - new_t) + tl.sum(tl.exp2(t - new_t), 0)
            m_s = new_s
            m_t = new_t
        lse2_s = m_s + tl.log2(z_s)
        lse2_t = m_t + tl.log2(z_t)

        # pass 2: the divergence (and the row sum the gradient needs), in bits
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, full, BLOCK):
            ls, lt = _log2_probs(s_row, t_row, start + cols, None, c, lse2_s, lse2_t, False)
            a, b = _kl_terms(ls, lt, beta, MODE)
            acc_a += a
            acc_b += b
        if full < V:
            idx = full + cols
            mask = idx < V
            ls, lt = _log2_probs(s_row, t_row, idx, mask, c, lse2_s, lse2_t, True)
            a, b = _kl_terms(ls, lt, beta, MODE)
            acc_a += tl.where(mask, a, 0.0)
            acc_b += tl.where(mask, b, 0.0)
        kl_a = tl.sum(acc_a, 0) * _LN2
        kl_b = tl.sum(acc_b, 0) * _LN2
        if MODE == 2:
            tl.store(loss_ptr + row, beta * kl_a + (1.0 - beta) * kl_b)
            shift = kl_b * grad_scale
        else:
            tl.store(loss_ptr + row, kl_a)
            shift = kl_a * grad_scale
        if MODE == 0:
            g_scale = grad_scale
        else:
            g_scale = grad_scale * _LN2

        # pass 3: dL/d(student logits), over the student's logits
        out = s_ptr.dtype.element_ty
        for start in range(0, full, BLOCK):
            idx = start + cols
            ls, lt = _log2_probs(s_row, t_row, idx, None, c, lse2_s, lse2_t, False)
            tl.store(s_row + idx, _logit_grad(ls, lt, beta, g_scale, shift, MODE).to(out))
        if full < V:
            idx = full + cols
            mask = idx < V
            ls, lt = _log2_probs(s_row, t_row, idx, mask, c, lse2_s, lse2_t, True)
            tl.store(s_row + idx, _logit_grad(ls, lt, beta, g_scale, shift, MODE).to(out), mask=mask)


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
        LOG2E * inv_tau, beta, scale,
        MODE=mode, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return loss
