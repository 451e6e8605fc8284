"""The bypassed head is applied in the dtype the forward's autocast would have used.

Axolotl keeps a full fine-tune's ``embed_tokens`` / ``lm_head`` in float32 and Accelerate
runs the forward in bf16 autocast (``bf16: true``): the model's own head would compute
in bf16, so the fused loss must too (on an H200 the float32 head cost a 0.5B student
+0.28 s and +2.5 GiB a step through `axolotl train`, `benchmarks/bench_cli.py`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from axolotl_gold.scoring import objectives
from axolotl_gold.scoring.forward import CompletionStates, completion_states
from axolotl_gold.scoring.objectives import JsdObjective

VOCAB = 96


def _model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    model.lm_head.weight.data.mul_(8.0)  # peaked distributions: bf16 rounding shows in the loss
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[1, :2] = -100
    return {"input_ids": torch.randint(0, VOCAB, (2, 11), generator=g),
            "attention_mask": torch.ones(2, 11, dtype=torch.long), "completion_labels": labels}


def _accelerate_bf16(model):
    """The student as Accelerate runs it for `bf16: true` (forward in autocast, outputs to float32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)


def test_the_forward_records_the_autocast_dtype_of_a_float32_head():
    model, batch = _model(), _batch()
    plain = completion_states(model, batch, use_head_bypass=True)
    assert plain.compute_dtype is None and plain.head_weight() is model.lm_head.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = completion_states(model, batch, use_head_bypass=True)
    assert states.compute_dtype == torch.bfloat16 and states.head_weight().dtype == torch.bfloat16
    wrapped = completion_states(_accelerate_bf16(model), batch, use_head_bypass=True)
    assert wrapped.values.dtype == torch.float32  # Accelerate converts the outputs back
    assert wrapped.compute_dtype == torch.bfloat16
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is back after the forward


def test_a_bf16_head_or_float16_autocast_keeps_the_head_dtype():
    model, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.float16):
        assert completion_states(model, batch, use_head_bypass=True).compute_dtype is None
    model = model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert completion_states(model, batch, use_head_bypass=True).compute_dtype is None


def test_fused_loss_equals_the_model_computing_its_own_head_in_autocast(monkeypatch):
    """Loss and the float32 head's gradient of the fused path (head bypassed, applied in
    bf16 by the loss) against the model applying its head inside bf16 autocast."""
    student, teacher, batch = _model(0), _model(1), _batch()
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=4, vocab_size=VOCAB)
    seen = []
    real = objectives.fused_jsd_loss_sum
    monkeypatch.setattr(objectives, "fused_jsd_loss_sum",
                        lambda s, w, *a, **k: seen.append((w.dtype, k["compute_dtype"])) or real(s, w, *a, **k))
    with torch.no_grad():
        teacher_states = completion_states(teacher, batch, use_head_bypass=True)

    def run(bypass: bool):
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = completion_states(student, batch, use_head_bypass=bypass)
        if not bypass:
            teacher_logits = teacher.lm_head(teacher_states.values)
            states.values = states.values.float()
            loss = objective(states, type(states)(values=teacher_logits, head=None), batch)
        else:
            loss = objective(states, teacher_states, batch)
        loss.backward()
        return loss.detach(), student.lm_head.weight.grad.clone()

    fused_loss, fused_grad = run(True)
    assert seen == [(torch.float32, torch.bfloat16)]  # the master head, computed in bf16
    reference_loss, reference_grad = run(False)
    assert fused_grad.dtype == torch.float32
    torch.testing.assert_close(fused_loss, reference_loss, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=0.05, atol=2e-3)
    # and not what a float32 head gives: the bf16 rounding of the logits is visible
    student.zero_grad(set_to_none=True)
    float32 = objective(completion_states(student, batch, use_head_bypass=True), teacher_states, batch).detach()
    assert abs(float(float32 - reference_loss)) > 5 * abs(float(fused_loss - reference_loss)), (
        float32, fused_loss, reference_loss)


@pytest.mark.parametrize("bias", [False, True])
def test_logits_path_casts_weight_and_bias(bias):
    model = torch.nn.Linear(8, 5, bias=bias)
    rows = torch.randn(3, 8)
    states = CompletionStates(values=rows, head=model, compute_dtype=torch.bfloat16)
    out = objectives._logits(states, rows)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(rows.bfloat16(), model.weight.bfloat16(),
                                          None if not bias else model.bias.bfloat16())
    torch.testing.assert_close(out, expected)


# The fused JSD takes the float32 master head and computes in bf16 itself (``compute_dtype``),
# where a differentiable ``weight.to(bf16)`` before it (what autocast does for the model's own
# head) would round the head's gradient to bf16 on its way into the float32 parameter and
# allocate a bf16 and a float32 [V, H] copy of it in backward.
_N, _H, _V = 256, 32, 384


def _head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(_N, _H, generator=g), torch.randn(_V, _H, generator=g) * 0.6,
            torch.randn(_N, _H, generator=g), torch.randn(_V, _H, generator=g) * 0.6)


def _head_grad(weight_arg, compute_dtype, hidden, weight, t_hidden, t_weight, chunk=64):
    from axolotl_gold.losses import chunked_jsd_loss_sum

    master = weight.clone().requires_grad_(True)
    w = weight_arg(master)
    loss = chunked_jsd_loss_sum(hidden.bfloat16(), w, t_hidden.bfloat16(), t_weight.bfloat16(), beta=0.5,
                                temperature=1.0, chunk_size=chunk, compute_dtype=compute_dtype)
    loss.backward()
    return master.grad


def _exact_head_grad(hidden, weight, t_hidden, t_weight):
    """float64 gradient of the JSD of the bf16-rounded operands' logits (the math the bf16
    path approximates), with respect to the float32 head."""
    from axolotl_gold.losses import generalized_jsd_token_loss

    rounded = [x.bfloat16().double() for x in (hidden, weight, t_hidden, t_weight)]
    w = rounded[1].requires_grad_(True)
    loss = generalized_jsd_token_loss(rounded[0] @ w.t(), rounded[2] @ rounded[3].t(), beta=0.5, temperature=1.0)
    loss.sum().backward()
    return w.grad


def test_float32_head_gradient_as_precise_as_the_cast_path():
    inputs = _head_inputs()
    exact = _exact_head_grad(*inputs)
    ours = _head_grad(lambda m: m, torch.bfloat16, *inputs)
    via_cast = _head_grad(lambda m: m.to(torch.bfloat16), None, *inputs)  # the bf16 round trip
    assert ours.dtype == via_cast.dtype == torch.float32
    ours_error = (ours.double() - exact).norm() / exact.norm()
    cast_error = (via_cast.double() - exact).norm() / exact.norm()
    # both round the logit gradient to bf16 for the matmul (what bounds the error here,
    # about 1%); the cast path rounds the summed gradient once more, ours does not
    assert ours_error <= cast_error and ours_error < 0.02, (float(ours_error), float(cast_error))
    torch.testing.assert_close(ours, via_cast, rtol=0.02, atol=2e-3)


def _fresh_bytes_in(fn) -> int:
    """Bytes of the tensors ops return in new storage (not a view or an in-place result of
    one of their inputs) while ``fn`` runs: what it allocates."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    total = [0]

    class Fresh(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    total[0] += t.untyped_storage().nbytes()
            return out

    with Fresh():
        fn()
    return total[0]


@pytest.mark.parametrize("chunk", [64, _N])  # a float32 accumulator of several products; one product
def test_backward_of_a_float32_head_allocates_no_copy_of_it(chunk):
    from axolotl_gold.losses import chunked_jsd_loss_sum

    hidden, weight, t_hidden, t_weight = _head_inputs()
    head_bytes = _V * _H * 4

    def backward_bytes(cast_first: bool) -> int:
        master = weight.clone().requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        w = master.to(torch.bfloat16) if cast_first else master
        loss = chunked_jsd_loss_sum(h, w, t_hidden, t_weight.bfloat16(), chunk_size=chunk,
                                    compute_dtype=None if cast_first else torch.bfloat16)
        return _fresh_bytes_in(loss.backward)

    assert backward_bytes(cast_first=False) < head_bytes / 4  # scalars only: both gradients scaled in place
    assert backward_bytes(cast_first=True) >= head_bytes  # at least the float32 cast of a bf16 gradient


@pytest.mark.e2e
def test_bf16_full_finetune_head_gradient_through_the_cli(tiny_pair, tmp_path, monkeypatch):
    """`axolotl train` with `bf16: true` on the CPU (a full fine-tune: Axolotl upcasts the
    embeddings and head to float32, Accelerate runs the forward in bf16 autocast): one SGD step
    (lr 1) moves the float32 head by minus its gradient. The fused loss (head bypassed, applied
    in bf16 by the loss, its float32 gradient handed back) against `gold_fused_loss: false`
    (the model applies its own head in autocast, the loss reads its logits): the same step
    up to the loss's rounding. (Against a float32 run the step differs by ~25% on these tiny
    random models, by either path: the bf16 body, not the loss. ULD has no unfused path:
    its float32-master path is tested in tests/losses/test_uld.py.)"""
    from axolotl_run import sgd_delta

    tests = str(Path(__file__).resolve().parent)  # for the `cpu_bf16_plugin.UseCpu` plugin
    # the CPU on any host: on a GPU machine Axolotl's loader would put the model on cuda:0
    # while `use_cpu` keeps the batches on the CPU (index_select across devices, seen on an H100)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    extra = dict(bf16=True, plugins=["axolotl_gold.GoldPlugin", "cpu_bf16_plugin.UseCpu"])
    fused, _ = sgd_delta(tiny_pair, tmp_path, "fused", 4, 1, 1, **extra)
    own_head, _ = sgd_delta(tiny_pair, tmp_path, "own_head", 4, 1, 1, gold_fused_loss=False, **extra)
    head = [k for k in fused if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight")]
    assert head
    for key in head:
        assert fused[key].dtype == torch.float32 and float(own_head[key].norm()) > 0, key
        rel = float((fused[key] - own_head[key]).norm() / own_head[key].norm())
        print(f"{key}: fused vs the model's own autocast head, relative L2 {rel:.2e}")
        assert rel < 2e-2, (key, rel)


@pytest.mark.parametrize("vocab_size", [None, _V])
def test_objective_hands_the_whole_head_to_the_loss(vocab_size):
    """Through ``JsdObjective`` (the trainer's path): no slice of the head when the compared
    vocabulary is all of it (a slice's backward allocates a zero ``[V, H]`` to copy into), so
    backward allocates nothing head-sized; a real sub-vocabulary still slices (the contrast)."""
    hidden, weight, t_hidden, t_weight = _head_inputs()
    head, t_head = torch.nn.Linear(_H, _V, bias=False), torch.nn.Linear(_H, _V, bias=False)
    head.weight.data.copy_(weight)
    t_head.weight.data.copy_(t_weight)
    values = hidden[:16].reshape(2, 8, _H).clone().requires_grad_(True)  # small beside the head
    batch = {"completion_labels": torch.ones(2, 8, dtype=torch.long)}
    student = CompletionStates(values=values, head=head, compute_dtype=torch.bfloat16)
    teacher = CompletionStates(values=t_hidden[:16].reshape(2, 8, _H).bfloat16(), head=t_head.bfloat16())
    head_bytes = _V * _H * 4

    def backward_bytes(vocab):
        head.zero_grad(set_to_none=True)
        loss = JsdObjective(beta=0.5, temperature=1.0, chunk_size=64, vocab_size=vocab)(student, teacher, batch)
        return _fresh_bytes_in(loss.backward)

    assert backward_bytes(vocab_size) < head_bytes / 2
    assert head.weight.grad.dtype == torch.float32 and float(head.weight.grad.norm()) > 0
    assert backward_bytes(_V - 1) >= head_bytes  # a real slice: its backward's zero [V, H]
