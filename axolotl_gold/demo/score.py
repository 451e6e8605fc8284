"""Greedy exact-match scoring of a model (or a PEFT adapter) on a messages jsonl."""

from __future__ import annotations

import json
import os

from axolotl_gold.demo import task


def _torch():
    import torch

    return torch


def load_model_and_tokenizer(path: str):
    """Load a saved model directory, or a PEFT adapter directory on top of its base.

    The tokenizer is taken from ``path`` when it has one, else from the base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.exists(adapter_cfg):
        from peft import PeftModel

        with open(adapter_cfg) as f:
            base = json.load(f)["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_torch().float32)
        model = PeftModel.from_pretrained(model, path)
        model = model.merge_and_unload()
        tok_dir = path if _has_tokenizer(path) else base
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch().float32)
        tok_dir = path
        if not _has_tokenizer(path):
            base = getattr(model.config, "_name_or_path", None)
            if base and _has_tokenizer(base):
                tok_dir = base
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model.eval()
    return model, tokenizer


def _has_tokenizer(path: str) -> bool:
    return bool(path) and (
        os.path.exists(os.path.join(path, "tokenizer.json"))
        or os.path.exists(os.path.join(path, "tokenizer_config.json"))
    )


def generate_answers(model, tokenizer, prompts, batch_size: int = 64, max_new_tokens: int | None = None):
    """Greedy completions (decoded text, special tokens dropped) for user prompts."""
    torch = _torch()
    max_new_tokens = max_new_tokens or task.MAX_NEW_TOKENS
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = [
        tokenizer.apply_chat_template(task.to_messages(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = [tokenizer(t, add_special_tokens=False).input_ids for t in texts[i : i + batch_size]]
                width = max(len(c) for c in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, c in enumerate(chunk):  # left padding
                    ids[j, width - len(c) :] = torch.tensor(c)
                    mask[j, width - len(c) :] = 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    num_beams=1,
                )
                for row in gen[:, width:].tolist():
                    if eos in row:
                        row = row[: row.index(eos)]
                    outs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outs


def accuracy(model, tokenizer, examples, batch_size: int = 64) -> float:
    """Exact-match accuracy of greedy decoding on ``(prompt, answer)`` pairs."""
    if not examples:
        return 0.0
    preds = generate_answers(model, tokenizer, [p for p, _ in examples], batch_size=batch_size)
    return sum(task.score(p, a) for p, (_, a) in zip(preds, examples)) / len(examples)


def score_model(model_dir_or_adapter_dir: str, eval_jsonl: str, n: int | None = None, batch_size: int = 64) -> float:
    """Greedy exact-match accuracy of a saved model (or PEFT adapter) on ``eval_jsonl``."""
    from axolotl_gold.demo.models import read_jsonl

    torch = _torch()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_dir_or_adapter_dir)
    return accuracy(model, tokenizer, read_jsonl(eval_jsonl, n), batch_size=batch_size)
