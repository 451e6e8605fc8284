"""Tiny Qwen2-architecture teacher/student configs and a random-weight pair for tests.

Both use ``head_dim`` 64 (vLLM's CPU attention backend refuses smaller heads), so
``num_attention_heads = hidden_size // 64``; untied embeddings; vocab, eos, pad
and bos ids come from the tokenizer; 256 positions.

* teacher: hidden 128, 4 layers, 2 heads, MLP 512 (~1.1M parameters)
* student: hidden 64, 2 layers, 1 head, MLP 256 (~0.17M parameters)
"""

from __future__ import annotations

import json
import os

from axolotl_gold.demo import task
from axolotl_gold.demo.tokenizers import build_bpe_tokenizer, build_char_tokenizer, portable_tokenizer_config

HEAD_DIM = 64
MAX_POSITIONS = 256

TEACHER_ARCH = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512}
STUDENT_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256}
ROPE_THETA = 10000.0


def make_config(tokenizer, hidden_size: int, num_hidden_layers: int, intermediate_size: int):
    from transformers import Qwen2Config

    heads = max(1, hidden_size // HEAD_DIM)
    assert heads * HEAD_DIM == hidden_size, "hidden_size must be a multiple of 64"
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        max_window_layers=num_hidden_layers,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        dtype="float32",
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def teacher_config(tokenizer):
    return make_config(tokenizer, **TEACHER_ARCH)


def student_config(tokenizer):
    return make_config(tokenizer, **STUDENT_ARCH)


def new_model(config, seed: int = 0):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


def save_model(model, tokenizer, out_dir: str) -> None:
    """``save_pretrained`` model and tokenizer, plus ``rope_theta`` at the top level of
    ``config.json`` so transformers 4.x (vLLM hosts) reads the same rotary base."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_config(out_dir, tokenizer.chat_template)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("rope_theta", ROPE_THETA)
    cfg.setdefault("head_dim", HEAD_DIM)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def write_jsonl(path: str, examples) -> None:
    """Write ``(prompt, answer)`` pairs as chat ``messages`` rows."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for prompt, answer in examples:
            f.write(json.dumps({"messages": task.to_messages(prompt, answer)}) + "\n")


def read_jsonl(path: str, n: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs from a messages jsonl (first user / last assistant turn)."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            msgs = row["messages"]
            prompt = next(m["content"] for m in msgs if m["role"] == "user")
            answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
            out.append((prompt, answer))
            if n is not None and len(out) >= n:
                break
    return out


def write_data(out_dir: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[str, str]:
    """``out_dir/data/{train,eval}.jsonl`` with disjoint prompts. Returns their paths."""
    eval_split = task.make_split(n_eval, seed=10_000 + seed)
    train_split = task.make_split(n_train, seed=20_000 + seed, exclude=[p for p, _ in eval_split])
    train_path = os.path.join(out_dir, "data", "train.jsonl")
    eval_path = os.path.join(out_dir, "data", "eval.jsonl")
    write_jsonl(train_path, train_split)
    write_jsonl(eval_path, eval_split)
    return train_path, eval_path


def build_tiny_pair(out_dir: str, cross_tokenizer: bool = False, seed: int = 0) -> dict:
    """Random-weight teacher and student (with tokenizers) plus a tiny dataset.

    Writes ``out_dir/teacher``, ``out_dir/student`` and ``out_dir/data/{train,eval}.jsonl``
    (64 and 16 rows). With ``cross_tokenizer`` the teacher uses the BPE tokenizer.
    Returns the paths.
    """
    student_tok = build_char_tokenizer()
    teacher_tok = build_bpe_tokenizer() if cross_tokenizer else student_tok
    teacher = new_model(teacher_config(teacher_tok), seed=seed)
    student = new_model(student_config(student_tok), seed=seed + 1)
    paths = {
        "teacher": os.path.join(out_dir, "teacher"),
        "student": os.path.join(out_dir, "student"),
    }
    save_model(teacher, teacher_tok, paths["teacher"])
    save_model(student, student_tok, paths["student"])
    paths["train"], paths["eval"] = write_data(out_dir, 64, 16, seed=seed)
    return paths

