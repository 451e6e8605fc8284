"""Gradient accumulation with a student compiled into CUDA graphs (``trainer.grad_buffers``).

Under ``torch.compile(mode="reduce-overhead")`` the backward's outputs live in the graphs'
memory pool; if autograd installs one as ``.grad``, the next micro-batch's replay overwrites
it (pytorch/pytorch#169545). ``own_grad_buffers`` gives the parameters their own zero
``.grad`` first. The CUDA test runs GOLD's loss over a window of micro-batches of two
widths through the graphed student and compares the accumulated gradients with eager mode's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from axolotl_gold.config.validation import graphed_compile
from axolotl_gold.data.batching import Rollout
from axolotl_gold.scoring.loss import loss_sum, scoring_batch
from axolotl_gold.scoring.objectives import JsdObjective
from axolotl_gold.trainer.grad_buffers import own_grad_buffers

VOCAB = 64


def _model(seed, tied: bool = False, suite_shape: bool = False):
    """A tiny Qwen2; ``suite_shape``: a two-layer Llama of the GPU suite's student width
    (SmolLM2-135M's: 9 heads of 64, 3 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if suite_shape:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          attn_implementation="sdpa", tie_word_embeddings=tied)
        return LlamaForCausalLM(cfg)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                      tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg)


def _window(seed, lengths):
    """Micro-batches of two rows each, of the given (prompt, completion) lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [Rollout(prompt_ids=torch.randint(3, VOCAB, (p,), generator=g).tolist(),
                    completion_ids=torch.randint(3, VOCAB, (c,), generator=g).tolist()) for p, c in lengths]
    return [scoring_batch(rows[i : i + 2], pad_id=0, multiple=4) for i in range(0, len(rows), 2)]


def _accumulate(student, teacher, window, objective, own: bool, autocast: bool = False):
    """One window's gradients, summed over its micro-batches as the trainer does (``autocast``:
    the forward and loss in bf16 autocast, as Accelerate runs ``bf16: true``)."""
    device = next(teacher.parameters()).device
    if own:
        own_grad_buffers(student.parameters())
    for micro in window:
        batch = {k: v.to(device) for k, v in micro.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            total, _ = loss_sum(student, teacher, batch, objective, fused=True)
        (total / 50).backward()


def test_own_grad_buffers_gives_zeros_only_where_a_trainable_parameter_has_none():
    model = _model(0)
    model.model.embed_tokens.weight.requires_grad_(False)
    kept = torch.ones_like(model.model.norm.weight)
    model.model.norm.weight.grad = kept
    trainable = [p for p in model.parameters() if p.requires_grad]
    given = own_grad_buffers(model.parameters())
    assert given == len(trainable) - 1
    assert model.model.embed_tokens.weight.grad is None  # frozen: nothing to accumulate
    assert model.model.norm.weight.grad is kept  # an existing .grad is the accumulator
    for p in trainable:
        if p is not model.model.norm.weight:
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
            assert not p.grad.any()
            assert p.grad.data_ptr() != p.data_ptr()
    assert own_grad_buffers(model.parameters()) == 0


def test_owned_buffers_accumulate_what_autograd_does_without_them():
    student, teacher = _model(0), _model(1)
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=8, vocab_size=VOCAB)
    window = _window(5, [(5, 6), (9, 2), (7, 11), (3, 4)])
    grads = []
    for own in (False, True):
        student.zero_grad(set_to_none=True)
        _accumulate(student, teacher, window, objective, own)
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("compile_", "mode", "graphed"), [
    (True, "reduce-overhead", True), (True, "max-autotune", True), (True, "default", False),
    (True, None, False), (False, "reduce-overhead", False), (None, None, False),
])
def test_graphed_compile_names_the_modes_that_record_cuda_graphs(compile_, mode, graphed):
    assert graphed_compile(compile_, mode) is graphed


def _graphed_against_eager(own: bool, checkpointing: dict | None = None, autocast: bool = False,
                           eval_first: bool = False, tied: bool = False, dtype=torch.float32,
                           suite_shape: bool = False, axolotl_upcast: bool = False) -> None:
    """Three windows through an eager student and its graphed copy; asserts equal gradients.
    ``checkpointing``: gradient checkpointing's kwargs on both (None: off); ``autocast``: bf16
    autocast forwards; ``eval_first``: a no-grad eval-mode pass first (the trainer's eval at step 0);
    ``tied``: the output head shares the embedding's weight; ``dtype``: the weights' (and the
    gradients') dtype; ``axolotl_upcast``: the embedding, a head tied to it and the norms
    in float32, as Axolotl leaves a full fine-tune (``_configure_embedding_dtypes``)."""
    device = torch.device("cuda")
    eager = _model(0, tied, suite_shape).to(device, dtype)
    teacher = _model(1, tied, suite_shape).to(device, dtype)
    if axolotl_upcast:
        eager.get_input_embeddings().float()
        eager.get_output_embeddings().float()
        for name, module in eager.named_modules():
            if "norm" in name:
                module.float()
    if checkpointing is not None:
        eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        eager.train()
    graphed_model = copy.deepcopy(eager)
    graphed = torch.compile(graphed_model, backend="inductor", mode="reduce-overhead")
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=8, vocab_size=VOCAB)
    if eval_first:
        for model, target in ((eager, eager), (graphed, graphed_model)):
            target.eval()
            with torch.no_grad():
                batch = {k: v.to(device) for k, v in _window(4, [(5, 6), (9, 2)])[0].items()}
                loss_sum(model, teacher, batch, objective, fused=True)
            target.train()
    if dtype == torch.bfloat16:  # bf16 gradients: another summation order moves the last bits
        tolerance = dict(rtol=5e-2, atol=2e-2)
    else:
        tolerance = dict(rtol=3e-2, atol=3e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    for seed in (5, 6, 7):  # the graphs record in the first windows and replay in the last
        window = _window(seed, [(5, 6), (9, 2), (7, 11), (3, 4), (6, 5), (4, 6)])
        grads = []
        for model, target in ((eager, eager), (graphed, graphed_model)):
            target.zero_grad(set_to_none=True)
            _accumulate(model, teacher, window, objective, own=own and model is graphed, autocast=autocast)
            grads.append([p.grad.clone() for p in target.parameters()])
        names = [name for name, _ in graphed_model.named_parameters()]
        bad = [n for n, g in zip(names, grads[1]) if not g.isfinite().all()]
        assert not bad, f"window {seed}: non-finite graphed gradients of {bad}"
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_graphed_student_accumulates_the_eager_gradients_over_a_window():
    _graphed_against_eager(own=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize(("autocast", "eval_first"), [(True, False), (False, True), (True, True)])
def test_graphed_student_as_the_trainer_runs_it(autocast, eval_first):
    """The trainer's differences from the plain loop: bf16 autocast, an eval pass before training."""
    _graphed_against_eager(own=True, autocast=autocast, eval_first=eval_first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize(("tied", "dtype", "suite_shape", "axolotl_upcast"), [
    (True, torch.float32, False, False), (False, torch.bfloat16, False, False),
    (True, torch.bfloat16, False, False), (True, torch.bfloat16, True, False),
    (True, torch.bfloat16, False, True), (True, torch.bfloat16, True, True),
])
def test_graphed_student_shaped_as_the_gpu_suites(tied, dtype, suite_shape, axolotl_upcast):
    """The GPU suite's student: a head tied to the embedding, bf16 weights, autocast, eval
    first, (``suite_shape``) its width and heads, (``axolotl_upcast``) Axolotl's float32
    embedding, head and norms."""
    _graphed_against_eager(own=True, autocast=True, eval_first=True, tied=tied, dtype=dtype,
                           suite_shape=suite_shape, axolotl_upcast=axolotl_upcast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("reentrant", [True, False])
def test_graphed_student_with_gradient_checkpointing(reentrant):
    _graphed_against_eager(own=True, checkpointing={"use_reentrant": reentrant})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_without_own_buffers_torch_still_breaks_the_accumulation():
    """What ``own_grad_buffers`` works around (pytorch/pytorch#169545): this fails once a torch
    release installs graph outputs as ``.grad`` safely, and the buffers can go."""
    with pytest.raises((RuntimeError, AssertionError)):
        _graphed_against_eager(own=False)
