"""The bypassed head is applied in the dtype the forward's autocast would have used.

Axolotl keeps a full fine-tune's ``embed_tokens`` / ``lm_head`` in float32 and Accelerate
runs the forward in bf16 autocast (``bf16: true``): the model's own head would compute
in bf16, so the fused loss must too (on an H200 the float32 head cost a 0.5B student
+0.28 s and +2.5 GiB a step through `axolotl train`, `benchmarks/bench_cli.py`)."""

from __future__ import annotations

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
                        lambda s, w, *a, **k: seen.append(w.dtype) or real(s, w, *a, **k))
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
    assert seen == [torch.bfloat16]
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
