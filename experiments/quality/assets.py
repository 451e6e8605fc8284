"""Teacher, students and data sets for the quality experiment, built from scratch.

* tokenizers: the demo's char-level tokenizer (``<|user|>..<|assistant|>..<|end|>``)
  for the teacher and the main student; the demo's byte-level BPE (its own special
  tokens, ids and ``<s>[INST]..[/INST]..</s>`` template) for the cross-tokenizer student;
* models: Llama configs (head_dim 64, untied embeddings), trained with plain PyTorch on
  completion-only cross-entropy (the demo's ``collate``), saved with the demo's
  ``save_model`` (HF checkpoint + tokenizer + chat template);
* the teacher trains on fresh examples until its greedy dev accuracy reaches a target;
  a student warms up on a *small fixed* set until its dev accuracy first passes
  ``warm_target`` (so it starts well below the teacher, knowing the format);
* data: ``train.jsonl`` (ground-truth completions, the GOLD arms' prompts and the
  off-policy / supervised-KD completions), ``teacher_samples.jsonl`` (the teacher's
  completions sampled at temperature 1 for the same prompts: SFT on teacher samples),
  ``eval.jsonl`` (held-out prompts).
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import task

# the package's demo helpers (tokenizers, checkpoint saving, batching, greedy decoding)
from axolotl_gold.demo.models import read_jsonl, save_model, write_jsonl
from axolotl_gold.demo.pretrain import collate
from axolotl_gold.demo.score import generate_answers
from axolotl_gold.demo.tokenizers import build_bpe_tokenizer, build_char_tokenizer

HEAD_DIM = 64
MAX_POSITIONS = 128
ROPE_THETA = 10000.0


def llama_config(tokenizer, hidden_size: int, num_hidden_layers: int, intermediate_size: int):
    from transformers import LlamaConfig

    heads = hidden_size // HEAD_DIM
    assert heads * HEAD_DIM == hidden_size, "hidden_size must be a multiple of 64"
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        dtype="float32",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def new_model(tokenizer, arch: dict, seed: int, device):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(tokenizer, **arch)
    model = LlamaForCausalLM(cfg)
    g = model.generation_config
    g.pad_token_id, g.eos_token_id, g.bos_token_id = cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id
    return model.to(device)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def accuracy(model, tokenizer, examples, batch_size: int, digits: int) -> float:
    if not examples:
        return 0.0
    preds = generate_answers(model, tokenizer, [p for p, _ in examples], batch_size=batch_size,
                             max_new_tokens=task.max_new_tokens(digits))
    return sum(task.is_correct(p, c) for (p, _), c in zip(examples, preds)) / len(examples)


def train(model, tokenizer, batches, *, lr, steps, warmup, device, dev, digits, eval_every, stop_at,
          min_steps=0, max_seconds=math.inf, eval_batch=512, log=print, name="model"):
    """AdamW on completion-only cross-entropy; ``batches`` yields lists of (prompt, answer).

    Every ``eval_every`` steps (from ``min_steps`` on) greedy dev accuracy is measured;
    training stops when it reaches ``stop_at`` or ``max_seconds`` has passed.
    Returns ``{"steps", "dev_accuracy", "seconds"}``.
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        frac = min(1.0, (s - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, acc, step = time.time(), 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        ids, mask, labels = (t.to(device) for t in collate(tokenizer, next(batches)))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        out_of_time = time.time() - t0 > max_seconds
        if (step % eval_every == 0 and step >= min_steps) or step == steps or out_of_time:
            acc = accuracy(model, tokenizer, dev, eval_batch, digits)
            model.train()
            log(f"[{name}] step {step} loss {loss.item():.4f} dev_acc {acc:.3f} ({time.time() - t0:.0f}s)")
            if acc >= stop_at or out_of_time:
                break
    model.eval()
    return {"steps": step, "dev_accuracy": acc, "seconds": round(time.time() - t0, 1)}


def endless(examples, batch_size: int, seed: int):
    """Batches drawn by epochs from a fixed list (the warm-up's "little data")."""
    rng = random.Random(seed)
    pool = list(examples)
    while True:
        rng.shuffle(pool)
        for i in range(0, len(pool) - batch_size + 1, batch_size):
            yield pool[i : i + batch_size]


def fresh(stream, batch_size: int):
    while True:
        yield [next(stream) for _ in range(batch_size)]


def sample_completions(model, tokenizer, prompts, *, temperature, batch_size, digits, seed) -> list[str]:
    """Completions sampled at ``temperature`` (plain multinomial sampling), decoded."""
    import torch

    from axolotl_gold.demo.task import to_messages

    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    outs = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(to_messages(p), add_generation_prompt=True, tokenize=False)
                     for p in prompts[i : i + batch_size]]
            chunk = tokenizer(texts, add_special_tokens=False).input_ids
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, c in enumerate(chunk):  # left padding
                ids[j, width - len(c):] = torch.tensor(c)
                mask[j, width - len(c):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=task.max_new_tokens(digits), eos_token_id=eos, pad_token_id=pad)
            for row in gen[:, width:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                outs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outs


def build(out_dir: str, spec: dict, device: str, log=print) -> dict:
    """Build everything under ``out_dir``; returns a summary (paths, accuracies, timings).

    ``spec`` keys: digits, seed, n_eval, n_dev, n_train (arm prompts), n_warm (the
    student's warm-up set), teacher / student (architectures), teacher_train /
    student_train (``train`` keyword arguments plus ``batch_size``), warm_target,
    cross_tokenizer (bool), sample_batch.
    """
    import torch

    digits, seed = spec["digits"], spec["seed"]
    t_start = time.time()
    paths = {k: os.path.join(out_dir, v) for k, v in {
        "teacher": "teacher", "student": "student", "student_bpe": "student_bpe",
        "train": "data/train.jsonl", "teacher_samples": "data/teacher_samples.jsonl",
        "eval": "data/eval.jsonl"}.items()}
    eval_split = task.make_split(spec["n_eval"], seed=10_000 + seed, digits=digits)
    dev = task.make_split(spec["n_dev"], seed=30_000 + seed, exclude=[p for p, _ in eval_split], digits=digits)
    held_out = {p for p, _ in eval_split} | {p for p, _ in dev}
    train_split = task.make_split(spec["n_train"], seed=20_000 + seed, exclude=held_out, digits=digits)
    warm_split = train_split[: spec["n_warm"]]
    write_jsonl(paths["eval"], eval_split)
    write_jsonl(paths["train"], train_split)

    char_tok = build_char_tokenizer()
    summary = {"paths": paths, "timings": {}}

    # teacher: fresh examples every step (never the held-out prompts)
    tt = dict(spec["teacher_train"])
    teacher = new_model(char_tok, spec["teacher"], seed, device)
    batches = fresh(task.sampler(40_000 + seed, held_out, digits), tt.pop("batch_size"))
    summary["teacher_train"] = train(teacher, char_tok, batches, device=device, dev=dev, digits=digits,
                                     log=log, name="teacher", **tt)
    summary["teacher_params"] = n_params(teacher)

    # students: the small warm-up set, until dev accuracy first reaches warm_target
    students = [("student", char_tok)]
    if spec.get("cross_tokenizer"):
        students.append(("student_bpe", build_bpe_tokenizer()))
    for name, tok in students:
        st = dict(spec["student_train"])
        student = new_model(tok, spec["student"], seed + 1, device)
        batches = endless(warm_split, st.pop("batch_size"), seed + 1)
        summary[f"{name}_train"] = train(student, tok, batches, device=device, dev=dev, digits=digits,
                                         stop_at=spec["warm_target"], log=log, name=name, **st)
        summary[f"{name}_params"] = n_params(student)
        save_model(student.float().cpu(), tok, paths[name])
        del student
    if not spec.get("cross_tokenizer"):
        paths.pop("student_bpe")

    # the teacher's own samples on the arm prompts (SFT on teacher samples)
    t0 = time.time()
    prompts = [p for p, _ in train_split]
    samples = sample_completions(teacher, char_tok, prompts, temperature=1.0, batch_size=spec["sample_batch"],
                                 digits=digits, seed=seed + 7)
    write_jsonl(paths["teacher_samples"], list(zip(prompts, samples)))
    summary["teacher_samples_correct"] = sum(task.is_correct(p, c) for p, c in zip(prompts, samples)) / len(prompts)
    summary["timings"]["teacher_samples_s"] = round(time.time() - t0, 1)
    save_model(teacher.float().cpu(), char_tok, paths["teacher"])
    summary["timings"]["build_s"] = round(time.time() - t_start, 1)
    summary["n"] = {"eval": len(eval_split), "dev": len(dev), "train": len(train_split), "warm": len(warm_split)}
    with open(os.path.join(out_dir, "assets.json"), "w") as f:
        json.dump(summary, f, indent=2)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


__all__ = ["build", "read_jsonl", "accuracy", "llama_config"]
