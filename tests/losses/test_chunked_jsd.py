"""chunked_jsd_loss_sum / fused_jsd_loss_sum against the plain full-logits loss."""

import itertools

import pytest
import torch

from axolotl_gold.losses import chunked_jsd_loss_sum, fused_jsd_loss_sum, generalized_jsd_token_loss

BETAS = (0.0, 0.3, 0.5, 1.0)
TEMPERATURES = (1.0, 2.0)
GRID = list(itertools.product(BETAS, TEMPERATURES))
N, H, HT, V = 37, 16, 24, 50


def make_inputs(dtype=torch.float32, device="cpu", tokens=N, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    # Scales chosen so the logits spread over a few nats, like a trained lm_head's.
    return {
        "student_hidden": rand(tokens, H),
        "student_weight": rand(V, H, scale=0.5),
        "student_bias": rand(V, scale=0.5) if bias else None,
        "teacher_hidden": rand(tokens, HT),
        "teacher_weight": rand(V, HT, scale=0.5),
        "teacher_bias": rand(V, scale=0.5) if bias else None,
    }


STUDENT_KEYS = ("student_hidden", "student_weight", "student_bias")


def plain_loss_sum(inputs, beta, temperature, dtype=None):
    """Full logits for both models, then the per-token loss, summed; autograd does the rest."""
    x = {k: (v.to(dtype) if dtype is not None and v is not None else v) for k, v in inputs.items()}
    student_logits = x["student_hidden"] @ x["student_weight"].t()
    teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
    if x["student_bias"] is not None:
        student_logits = student_logits + x["student_bias"]
        teacher_logits = teacher_logits + x["teacher_bias"]
    return generalized_jsd_token_loss(student_logits, teacher_logits, beta=beta, temperature=temperature).sum()


def loss_and_grads(fn, inputs, trainable=STUDENT_KEYS):
    leaves = {
        k: (v.detach().clone().requires_grad_(k in trainable) if v is not None else None) for k, v in inputs.items()
    }
    loss = fn(leaves)
    loss.backward()
    return loss.detach(), {k: leaves[k].grad for k in trainable if leaves[k] is not None}


def chunked(beta, temperature, chunk_size, **kwargs):
    return lambda x: chunked_jsd_loss_sum(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
        beta=beta, temperature=temperature, chunk_size=chunk_size,
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], **kwargs,
    )


def assert_grads_close(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("beta,temperature", GRID)
@pytest.mark.parametrize("chunk_size", [8, 1, 64])
def test_float32_matches_float64_plain_loss(chunk_size, beta, temperature):
    inputs = make_inputs(torch.float32)
    loss, got = loss_and_grads(chunked(beta, temperature, chunk_size), inputs)
    want_loss, want = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature, torch.float64), inputs)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(got, want, rtol=1e-4, atol=1e-5)
    assert got["student_hidden"].dtype == torch.float32


@pytest.mark.parametrize("beta,temperature", GRID)
def test_float64_is_exact(beta, temperature):
    inputs = make_inputs(torch.float64)
    loss, got = loss_and_grads(chunked(beta, temperature, 8), inputs)
    want_loss, want = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature), inputs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta,temperature", GRID)
def test_bfloat16_matches_plain_loss_loosely(beta, temperature):
    inputs = make_inputs(torch.bfloat16)
    loss, got = loss_and_grads(chunked(beta, temperature, 8), inputs)
    plain_loss, plain = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature), inputs)
    exact_loss, exact = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature, torch.float64), inputs)
    assert loss.dtype == torch.float32
    assert {g.dtype for g in got.values()} == {torch.bfloat16}
    # bf16 logits carry ~3 significant digits; the loss itself is summed in float32.
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, plain_loss, rtol=2e-2, atol=2e-2)
    for key in exact:
        scale = exact[key].abs().max().item()
        assert (got[key].double() - exact[key]).abs().max().item() < 3e-2 * scale, key
        assert (got[key].double() - plain[key].double()).abs().max().item() < 3e-2 * scale, key


def test_frozen_lm_head_gets_no_gradient_and_hidden_grad_is_unchanged():
    inputs = make_inputs(torch.float32)
    _, full = loss_and_grads(chunked(0.5, 1.0, 8), inputs)
    loss, frozen = loss_and_grads(chunked(0.5, 1.0, 8), inputs, trainable=("student_hidden",))
    assert frozen.keys() == {"student_hidden"}
    torch.testing.assert_close(frozen["student_hidden"], full["student_hidden"], rtol=0, atol=0)


def test_teacher_never_gets_gradients():
    inputs = make_inputs(torch.float32)
    trainable = STUDENT_KEYS + ("teacher_hidden", "teacher_weight", "teacher_bias")
    _, got = loss_and_grads(chunked(0.5, 1.0, 8), inputs, trainable=trainable)
    for key in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert got[key] is None, key
    assert got["student_hidden"].abs().sum() > 0


def test_upstream_gradient_scales_and_a_second_backward_is_refused():
    """backward scales the forward's gradient buffers in place (no second [V, H] buffer):
    the upstream gradient reaches every input, and a second backward through the same graph
    says what to do instead of returning twice-scaled gradients."""
    inputs = make_inputs(torch.float32)
    _, once = loss_and_grads(chunked(0.3, 2.0, 8), inputs)
    leaves = {k: v.clone().requires_grad_(k in STUDENT_KEYS) for k, v in inputs.items()}
    loss = chunked(0.3, 2.0, 8)(leaves)
    (-2.5 * loss).backward(retain_graph=True)
    for key in STUDENT_KEYS:
        torch.testing.assert_close(leaves[key].grad, -2.5 * once[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        (3.0 * loss).backward()


def test_no_grad_and_no_bias():
    inputs = make_inputs(torch.float32, bias=False)
    with torch.no_grad():
        loss = chunked(0.5, 1.0, 8)(inputs)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), plain_loss_sum(inputs, 0.5, 1.0, torch.float64), rtol=1e-5, atol=1e-5)
    _, got = loss_and_grads(chunked(0.5, 1.0, 8), inputs)
    assert got.keys() == {"student_hidden", "student_weight"}


def test_leading_dims_are_flattened_and_empty_input_is_zero():
    inputs = make_inputs(torch.float32, tokens=36)
    flat_loss, flat = loss_and_grads(chunked(0.5, 1.0, 8), inputs)
    shaped = dict(inputs, student_hidden=inputs["student_hidden"].reshape(4, 9, H),
                  teacher_hidden=inputs["teacher_hidden"].reshape(4, 9, HT))
    loss, got = loss_and_grads(chunked(0.5, 1.0, 8), shaped)
    torch.testing.assert_close(loss, flat_loss)
    torch.testing.assert_close(got["student_hidden"].reshape(36, H), flat["student_hidden"])

    empty = make_inputs(torch.float32, tokens=0)
    loss, got = loss_and_grads(chunked(0.5, 1.0, 8), empty)
    assert loss.item() == 0.0
    assert (got["student_weight"] == 0).all()


def test_rejects_vocabulary_mismatch_and_bad_arguments():
    inputs = make_inputs(torch.float32, bias=False)
    with pytest.raises(ValueError, match="shared vocabulary"):
        chunked_jsd_loss_sum(inputs["student_hidden"], inputs["student_weight"],
                             inputs["teacher_hidden"], torch.randn(V + 1, HT))
    with pytest.raises(ValueError, match="same tokens"):
        chunked_jsd_loss_sum(inputs["student_hidden"], inputs["student_weight"],
                             inputs["teacher_hidden"][:-1], inputs["teacher_weight"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_jsd_loss_sum(inputs["student_hidden"], inputs["student_weight"],
                             inputs["teacher_hidden"], inputs["teacher_weight"], chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        chunked_jsd_loss_sum(inputs["student_hidden"], inputs["student_weight"],
                             inputs["teacher_hidden"], inputs["teacher_weight"], beta=-0.1)


def fused(beta, temperature, chunk_size, backend):
    return lambda x: fused_jsd_loss_sum(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
        beta=beta, temperature=temperature, chunk_size=chunk_size,
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], backend=backend,
    )


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_on_cpu_is_the_torch_path(backend):
    inputs = make_inputs(torch.float32)
    loss, got = loss_and_grads(fused(0.3, 2.0, 8, backend), inputs)
    want_loss, want = loss_and_grads(chunked(0.3, 2.0, 8), inputs)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert_grads_close(got, want, rtol=0, atol=0)


def test_fused_liger_refuses_cpu_and_unknown_backend():
    inputs = make_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="CUDA|liger"):
        fused(0.5, 1.0, 8, "liger")(inputs)
    with pytest.raises(ValueError, match="backend"):
        fused(0.5, 1.0, 8, "triton")(inputs)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("path", ["triton", "compiled", "eager"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta,temperature", GRID)
def test_cuda_float32_matches_float64_plain_loss(monkeypatch, beta, temperature, bias, path):
    import axolotl_gold.losses.chunked as chunked_module

    monkeypatch.setattr(chunked_module, "USE_TRITON", path == "triton")
    monkeypatch.setattr(chunked_module, "COMPILE_ON_CUDA", path == "compiled")
    inputs = make_inputs(torch.float32, device="cuda", bias=bias)
    loss, got = loss_and_grads(chunked(beta, temperature, 8), inputs)
    want_loss, want = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature, torch.float64), inputs)
    assert chunked_module.COMPILE_ON_CUDA == (path == "compiled")  # no silent fallback to eager
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(got, want, rtol=1e-4, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("n", [300, 200])
@pytest.mark.parametrize("beta,temperature", GRID)
def test_triton_kernel_matches_compiled_in_bf16_at_vocab_scale(monkeypatch, beta, temperature, n):
    """Large vocabulary (many blocks per row, a ragged last block), bf16 as in training.
    n 300: 3 chunks, the kernel path sums 2 products in float32; n 200: 2 chunks, one
    product written in bf16 directly (the compiled path sums 2 in float32 either way)."""
    import axolotl_gold.losses.chunked as chunked_module
    from axolotl_gold.losses.chunked import chunked_jsd_loss_sum

    g = torch.Generator(device="cuda").manual_seed(0)
    v, h, ht = 50_003, 64, 96
    x = {
        "student_hidden": torch.randn(n, h, device="cuda", generator=g).bfloat16(),
        "student_weight": (torch.randn(v, h, device="cuda", generator=g) * 0.3).bfloat16(),
        "teacher_hidden": torch.randn(n, ht, device="cuda", generator=g).bfloat16(),
        "teacher_weight": (torch.randn(v, ht, device="cuda", generator=g) * 0.3).bfloat16(),
    }
    results = []
    for use_triton in (True, False):
        monkeypatch.setattr(chunked_module, "USE_TRITON", use_triton)
        sh = x["student_hidden"].clone().requires_grad_()
        sw = x["student_weight"].clone().requires_grad_()
        loss = chunked_jsd_loss_sum(sh, sw, x["teacher_hidden"], x["teacher_weight"],
                                    beta=beta, temperature=temperature, chunk_size=128)
        loss.backward()
        results.append((loss.float(), sh.grad.float(), sw.grad.float()))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    torch.testing.assert_close(l1, l2, rtol=2e-3, atol=1e-2)
    for a, b in ((gh1, gh2), (gw1, gw2)):
        assert float((a - b).norm() / b.norm()) < 1e-2


@requires_cuda
@pytest.mark.parametrize("n", [300, 200])
def test_triton_kernel_float32_master_head_computed_in_bf16(monkeypatch, n):
    """A float32 head with ``compute_dtype`` bf16 (Axolotl's full fine-tune under bf16
    autocast): the bf16 computation of a bf16 copy, its gradient handed back in float32."""
    import axolotl_gold.losses.chunked as chunked_module
    from axolotl_gold.losses.chunked import chunked_jsd_loss_sum

    monkeypatch.setattr(chunked_module, "USE_TRITON", True)
    g = torch.Generator(device="cuda").manual_seed(1)
    v, h = 50_003, 64
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    master = torch.randn(v, h, device="cuda", generator=g) * 0.3
    teacher = (torch.randn(n, h, device="cuda", generator=g).bfloat16(),
               (torch.randn(v, h, device="cuda", generator=g) * 0.3).bfloat16())
    grads = []
    for compute_dtype in (torch.bfloat16, None):
        w = master.clone().requires_grad_()
        arg = w if compute_dtype is not None else w.to(torch.bfloat16)  # the cast before: the old path
        loss = chunked_jsd_loss_sum(hidden, arg, *teacher, beta=0.5, chunk_size=128, compute_dtype=compute_dtype)
        loss.backward()
        grads.append((loss, w.grad))
    (ours_loss, ours), (cast_loss, via_cast) = grads
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours_loss, cast_loss)
    assert float((ours - via_cast).norm() / via_cast.norm()) < 5e-3


def _liger_importable():
    try:
        import liger_kernel.chunked_loss.jsd_loss  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


requires_cuda_liger = pytest.mark.skipif(
    not (torch.cuda.is_available() and _liger_importable()),
    reason="liger's fused linear JSD needs a CUDA device and an importable liger-kernel (triton)",
)


@requires_cuda_liger
@pytest.mark.parametrize("beta,temperature", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_matches_torch_on_cuda(dtype, beta, temperature):
    inputs = make_inputs(dtype, device="cuda", tokens=300)
    loss, got = loss_and_grads(fused(beta, temperature, 64, "liger"), inputs)
    want_loss, want = loss_and_grads(fused(beta, temperature, 64, "torch"), inputs)
    exact_loss, exact = loss_and_grads(lambda x: plain_loss_sum(x, beta, temperature, torch.float64), inputs)
    # float32: the same math up to rounding. bf16: liger takes the softmax and JSD in bf16.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), want_loss.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(want_loss.double(), exact_loss, rtol=tol, atol=tol)
    for key in want:
        scale = exact[key].abs().max().item()
        assert (got[key].double() - want[key].double()).abs().max().item() < 3 * tol * scale, key
        assert (want[key].double() - exact[key]).abs().max().item() < 3 * tol * scale, key


@requires_cuda_liger
def test_auto_picks_liger_only_for_float32_trainable_head(monkeypatch):
    import axolotl_gold.losses.fused as fused_module

    calls = []
    real = fused_module._liger_jsd_loss_sum
    monkeypatch.setattr(fused_module, "_liger_jsd_loss_sum", lambda *a: calls.append(a) or real(*a))
    inputs = make_inputs(torch.float32, device="cuda", tokens=300)
    loss_and_grads(fused(0.5, 1.0, 64, "auto"), inputs)
    assert len(calls) == 1
    loss_and_grads(fused(0.5, 1.0, 64, "auto"), inputs, trainable=("student_hidden",))
    loss_and_grads(fused(0.5, 1.0, 64, "auto"), make_inputs(torch.bfloat16, device="cuda", tokens=300))
    assert len(calls) == 1
