"""The student (SmolLM2-135M-Instruct with a subset of its layers), greedy answers, and
the teacher's per-token log-likelihood of answers, all on the CPU in float32."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import threading

EOS = 2  # <|im_end|>: the ChatML turn end, eos and pad of the cached checkpoint
# from_pretrained is not thread-safe (its meta-device init is process-global): two loads
# at once left meta tensors behind and a teacher that wrote noise
LOAD_LOCK = threading.Lock()


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok


def prune(teacher_dir: str, keep: list[int], out_dir: str) -> str:
    """Save the teacher with only layers ``keep`` (in order) as an HF checkpoint, with the
    teacher's tokenizer, chat template and generation config."""
    import torch

    model, tok = load(teacher_dir)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def prompt_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def greedy(model, tok, questions: list[str], max_new: int, batch_size: int = 16) -> list[dict]:
    """Greedy answers: ``{"ids": completion ids (ending on <|im_end|> when it stopped),
    "text": decoded without special tokens}`` per question."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(questions), batch_size):
            chunk = [prompt_ids(tok, q) for q in questions[i : i + batch_size]]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), EOS, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, c in enumerate(chunk):  # left padding
                ids[j, width - len(c):] = torch.tensor(c)
                mask[j, width - len(c):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 eos_token_id=EOS, pad_token_id=EOS, num_beams=1)
            for row in gen[:, width:].tolist():
                if EOS in row:
                    row = row[: row.index(EOS) + 1]
                out.append({"ids": row, "text": tok.decode(row, skip_special_tokens=True).strip()})
    return out


def teacher_logprob(model, tok, questions: list[str], completions: list[list[int]], batch_size: int = 16
                    ) -> list[float]:
    """The teacher's mean log-probability per completion token (the ids as generated, the
    closing <|im_end|> included when present) after the question rendered with its chat
    template and a generation prompt. An empty completion gets NaN."""
    import torch

    scores = []
    with torch.no_grad():
        for i in range(0, len(questions), batch_size):
            rows = [(prompt_ids(tok, q), c) for q, c in zip(questions[i : i + batch_size],
                                                            completions[i : i + batch_size])]
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), EOS, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (p, c) in enumerate(rows):  # right padding
                ids[j, : len(p) + len(c)] = torch.tensor(p + c)
                mask[j, : len(p) + len(c)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for j, (p, c) in enumerate(rows):
                if not c:
                    scores.append(math.nan)
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                scores.append(logp[j, pos, torch.tensor(c)].mean().item())
    return scores
