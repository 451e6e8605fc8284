"""The student's step without cuDNN's attention kernels (``trainer.attention_backends``).

On H100 / H200 cuDNN's attention backward gives NaN query gradients at sequence lengths of
64 more than a multiple of 128 when a query row attends to almost nothing (a left-padded
row's padding attends to nothing at all; pytorch/pytorch#196678). The CPU tests check the
switch and that `axolotl train` runs the student's forward, its backward and gradient
checkpointing's recomputation with cuDNN's kernels off, and evaluation and generation with
them on; the CUDA tests show the NaN at width 192 with cuDNN's kernels and finite gradients,
equal to the math kernel's, without them. Those run the batch as laid out, with its padding
mask (``scoring.causal_rows.ROLL_ROWS`` off: the layout the trainer keeps for eager attention,
narrow sliding windows, images, an applied head); the rows moved left leave no query attending
to nothing, and their gradients are the math kernel's on the masked layout too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from axolotl_gold.data.batching import Rollout
from axolotl_gold.scoring import causal_rows
from axolotl_gold.scoring.loss import loss_sum, scoring_batch
from axolotl_gold.scoring.objectives import JsdObjective
from axolotl_gold.trainer import attention_backends
from axolotl_gold.trainer.attention_backends import training_attention

VOCAB = 64


def test_training_attention_turns_cudnn_off_inside_and_restores_it():
    torch.backends.cuda.enable_cudnn_sdp(True)
    flash = torch.backends.cuda.flash_sdp_enabled()
    with training_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() == flash  # the others as they were
        with training_attention():  # nested: still off, and off again after the inner one
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(ValueError), training_attention():
        raise ValueError("a failed step")
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored on the way out of a failure too


def test_training_attention_keeps_a_users_cudnn_off(monkeypatch):
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with training_attention():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setattr(attention_backends, "EXCLUDE_CUDNN_ATTENTION", False)
    with training_attention():  # the probes' switch: nothing changed
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.e2e
def test_axolotl_train_runs_the_students_step_without_cudnn_attention(tiny_pair, tmp_path, monkeypatch):
    """Gradient checkpointing (non-reentrant) recomputes the forward inside the backward: that
    recomputation must see the switch too, and evaluation and generation must not."""
    from axolotl_run import gold_config, run_train

    tests = str(Path(__file__).resolve().parent)  # for the recording plugin
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    cfg = gold_config(
        tiny_pair, tmp_path, max_steps=2, save_steps=2, val_set_size=0.25, eval_strategy="steps", eval_steps=2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        plugins=["axolotl_gold.GoldPlugin", "attention_flags_plugin.RecordAttentionFlags"],
    )
    out = run_train(cfg, tmp_path)
    records = [json.loads(line) for line in (out / "attention_flags.jsonl").read_text().splitlines()]
    training = [r for r in records if r["kind"] == "backward" or r.get("grad")]
    others = [r for r in records if r["kind"] == "forward" and not r["grad"]]
    backward = [r for r in training if r["kind"] == "backward"]
    # every micro-step's forward, recomputation and backward: 2 steps x 2 micro-batches
    assert len(backward) >= 4 and len(training) >= 3 * len(backward) - 1, records
    assert not any(r["cudnn"] for r in training), training
    assert others and all(r["cudnn"] for r in others), others  # evaluation and generation


def _batch_of_width(width: int, device) -> dict:
    """Two rows scored in one micro-batch ``width`` wide: one fills it, the other is short, so
    its left padding is query rows that attend to nothing."""
    g = torch.Generator().manual_seed(0)
    prompt, completion = width // 2, width - width // 2
    rows = [Rollout(prompt_ids=torch.randint(3, VOCAB, (prompt,), generator=g).tolist(),
                    completion_ids=torch.randint(3, VOCAB, (completion,), generator=g).tolist()),
            Rollout(prompt_ids=torch.randint(3, VOCAB, (9,), generator=g).tolist(),
                    completion_ids=torch.randint(3, VOCAB, (7,), generator=g).tolist())]
    batch = scoring_batch(rows, pad_id=0)
    assert batch["input_ids"].shape[1] == width
    return {k: v.to(device) for k, v in batch.items()}


def _gradients(student, teacher, batch, backends=None, checkpointing: bool = False,
               rolled: bool = False) -> list[torch.Tensor]:
    """The student's gradients of GOLD's loss on ``batch`` in bf16, under ``backends``
    (``sdpa_kernel``'s list) or, None, ``training_attention``; the rows as laid out (padding
    mask) or, ``rolled``, moved left (``causal_rows``: no mask)."""
    from torch.nn.attention import sdpa_kernel

    student.zero_grad(set_to_none=True)
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=64, vocab_size=VOCAB)
    before, causal_rows.ROLL_ROWS = causal_rows.ROLL_ROWS, rolled
    try:
        with training_attention() if backends is None else sdpa_kernel(backends):
            total, _ = loss_sum(student, teacher, batch, objective, fused=True)
            total.backward()
    finally:
        causal_rows.ROLL_ROWS = before
    return [p.grad.float().clone() for p in student.parameters()]


def _models(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(**cfg)).to(device, torch.bfloat16)
    teacher = LlamaForCausalLM(LlamaConfig(**cfg)).to(device, torch.bfloat16)
    return student, teacher


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _sm90(), reason="cuDNN's attention bug is reported on H100 / H200 (sm90)")
def test_cudnn_attention_backward_gives_nan_at_width_192():
    """What ``training_attention`` works around: fails once torch's cuDNN attention gets the
    width right (pytorch/pytorch#196678), and the switch can go."""
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    student, teacher = _models(device)
    try:
        grads = _gradients(student, teacher, _batch_of_width(192, device), [SDPBackend.CUDNN_ATTENTION])
    except RuntimeError as error:  # no cuDNN attention for these inputs here: nothing to show
        pytest.skip(f"cuDNN attention does not run here: {error}")
    assert any(not g.isfinite().all() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's attention is CUDA's")
@pytest.mark.parametrize("width", [192, 256, 320])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("rolled", [False, True])
def test_students_step_has_the_math_kernels_gradients_at_every_width(width, checkpointing, rolled):
    """Our step (rows as laid out or rolled left) against the math kernel on the masked layout."""
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    student, teacher = _models(device)
    batch = _batch_of_width(width, device)
    ours = _gradients(student, teacher, batch, checkpointing=checkpointing, rolled=rolled)
    math = _gradients(student, teacher, batch, [SDPBackend.MATH], checkpointing=checkpointing)
    names = [n for n, _ in student.named_parameters()]
    assert not [n for n, g in zip(names, ours) if not g.isfinite().all()], "non-finite gradients"
    for name, a, b in zip(names, ours, math):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2, msg=name)  # bf16 gradients up to ~4 here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's attention is CUDA's")
def test_students_step_is_finite_at_every_width_where_cudnn_gives_nan():
    """Every width from 128 to 384 through our step: finite gradients. The widths where cuDNN's
    own kernels give NaN on this GPU are printed for the record (on sm90, the bug report's
    64 mod 128; whether others too tells if rounding widths could keep cuDNN instead)."""
    from axolotl_run import report
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    student, teacher = _models(device)
    broken, broken_rolled, ours_bad = [], [], []
    for width in range(128, 385):
        batch = _batch_of_width(width, device)
        for rolled in (False, True):
            if not all(g.isfinite().all() for g in _gradients(student, teacher, batch, rolled=rolled)):
                ours_bad.append((width, rolled))
        try:
            cudnn = _gradients(student, teacher, batch, [SDPBackend.CUDNN_ATTENTION])
            cudnn_rolled = _gradients(student, teacher, batch, [SDPBackend.CUDNN_ATTENTION], rolled=True)
        except RuntimeError:  # no cuDNN attention for these inputs here
            continue
        if not all(g.isfinite().all() for g in cudnn):
            broken.append(width)
        if not all(g.isfinite().all() for g in cudnn_rolled):
            broken_rolled.append(width)
    report(f"{torch.cuda.get_device_name()}: cuDNN attention's backward non-finite at widths {broken} "
           f"(padding mask), {broken_rolled} (rows rolled left, no mask)")
    assert not ours_bad, f"non-finite gradients through training_attention at (width, rolled) {ours_bad}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's flash kernel is CUDA's")
def test_rolled_rows_run_sdpas_flash_kernel_and_the_masked_layout_does_not():
    """What rolling the rows left is for: without a mask SDPA takes its flash kernels
    (forward and backward); with the padding mask it cannot."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    student, teacher = _models(device)
    batch = _batch_of_width(256, device)
    kernels = {}
    for rolled in (True, False):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _gradients(student, teacher, batch, rolled=rolled)
            torch.cuda.synchronize()
        kernels[rolled] = [e.key for e in prof.key_averages() if "flash" in e.key.lower()]
    assert any("bwd" in k.lower() or "backward" in k.lower() for k in kernels[True]), kernels[True]
    assert not kernels[False], kernels[False]
