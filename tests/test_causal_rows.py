"""Scoring rows moved left (``scoring.causal_rows``): the forward runs without a padding mask
and gives the masked layout's completion states and gradients; under ``torch.compile`` the
layers get no mask either (HF would build one while tracing); only where that is exact."""

from __future__ import annotations

import pytest
import torch

from axolotl_gold.data.batching import build_scoring_batch
from axolotl_gold.scoring import causal_rows
from axolotl_gold.scoring.forward import completion_states

VOCAB = 97


def _model(kind: str = "llama", seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    settings.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**settings))


def _batch(prompts=(5, 9, 3, 7), completions=(6, 2, 8, 0), multiple: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = lambda lengths: [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]  # noqa: E731
    return build_scoring_batch(rows(prompts), rows(completions), pad_id=0, multiple=multiple)


def _states_and_grads(model, batch, roll: bool, monkeypatch, forward=None):
    """The scored completion states and every parameter's gradient of a fixed random
    weighting of them (the loss reads scored positions only, as the objectives do)."""
    monkeypatch.setattr(causal_rows, "ROLL_ROWS", roll)
    model.zero_grad()
    states = completion_states(model if forward is None else forward, batch, use_head_bypass=True)
    scored = batch["completion_labels"] != -100
    weights = torch.randn(states.values.shape, generator=torch.Generator().manual_seed(2))
    (states.values * weights * scored[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return states.values[scored].detach(), grads


def _assert_same(rolled, masked):
    torch.testing.assert_close(rolled[0], masked[0], rtol=1e-5, atol=1e-5)
    assert rolled[1].keys() == masked[1].keys() and masked[1]
    for name, grad in masked[1].items():
        torch.testing.assert_close(rolled[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_rolled_rows_give_the_masked_layouts_states_and_gradients(kind, checkpointing, monkeypatch):
    model = _model(kind)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = _batch()
    assert causal_rows.rolls(model, batch, bypassed=True)
    _assert_same(_states_and_grads(model, batch, True, monkeypatch), _states_and_grads(model, batch, False, monkeypatch))
    assert model.config._attn_implementation == "sdpa"  # restored


def test_rolled_rows_of_a_lora_student(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = _batch(prompts=(4, 11, 6), completions=(9, 3, 5), multiple=1)
    rolled = _states_and_grads(model, batch, True, monkeypatch)
    assert any("lora" in name for name in rolled[1])
    _assert_same(rolled, _states_and_grads(model, batch, False, monkeypatch))


def test_rolled_left_moves_each_row_by_its_leading_pads():
    batch = _batch(prompts=(2, 4), completions=(3, 1), multiple=1)
    ids, lead = causal_rows.rolled_left(batch["input_ids"], batch["attention_mask"])
    assert lead.tolist() == [2, 0]
    for row in range(2):
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids[row, : len(real)].tolist() == real.tolist()  # the row's tokens first, in order
    # the completion states come from the columns the masked layout read, moved the same way
    states = torch.arange(2 * 7, dtype=torch.float).view(2, 7, 1)
    region = causal_rows.completion_region(states, lead, width=3)
    assert region[..., 0].tolist() == [[1.0, 2.0, 3.0], [10.0, 11.0, 12.0]]


class _AttentionSpy:
    """Stands in for a registered attention function: records whether each call got a mask,
    then runs SDPA's. Outside dynamo's graph, so it sees what the compiled forward hands over."""

    def __init__(self):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.masks: list[bool] = []
        self.sdpa = sdpa_attention_forward

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.record(attention_mask)
        return self.sdpa(module, query, key, value, attention_mask, **kwargs)

    @torch.compiler.disable
    def record(self, attention_mask):
        self.masks.append(attention_mask is not None)


@pytest.mark.parametrize("registered", [True, False])
def test_a_compiled_forward_hands_attention_no_mask(registered, monkeypatch):
    """Compiled, the rolled forward's layers get no mask (SDPA then runs ``is_causal``: flash
    on CUDA). Without the registered implementation, HF builds a full causal mask while
    tracing: the reason for it."""
    from transformers import AttentionInterface

    model, batch = _model(), _batch()
    spy = _AttentionSpy()
    name = causal_rows.CAUSAL_SDPA if registered else "sdpa"
    monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    if not registered:
        monkeypatch.setattr(causal_rows, "causal_attention", lambda config: _unchanged())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    rolled = _states_and_grads(model, batch, True, monkeypatch, forward=compiled)
    assert len(spy.masks) == model.config.num_hidden_layers
    assert not any(spy.masks) if registered else all(spy.masks)
    _assert_same(rolled, _states_and_grads(model, batch, False, monkeypatch))


def _unchanged():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("case", ["rolled", "switch off", "head applied", "eager attention", "narrow sliding window",
                                  "wide sliding window", "image batch"])
def test_rows_are_rolled_only_where_that_is_exact(case, monkeypatch):
    overrides = {"eager attention": {"attn_implementation": "eager"},
                 "narrow sliding window": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
                 "wide sliding window": {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}}
    model = _model("qwen2", **overrides.get(case, {}))
    batch = _batch()
    if case == "image batch":
        batch["vision"] = {"pixel_values": torch.zeros(1)}
    if case == "switch off":
        monkeypatch.setattr(causal_rows, "ROLL_ROWS", False)
    expected = case in ("rolled", "wide sliding window")
    assert causal_rows.rolls(model, batch, bypassed=case != "head applied") is expected
    if case == "narrow sliding window":  # the masked layout's sliding mask is what stays exact
        assert "sliding_window 8" in causal_rows.layout_blocker(model.config, batch["input_ids"].shape[1])
