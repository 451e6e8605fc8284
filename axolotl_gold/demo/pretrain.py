"""Supervised pre-training of the demo's teacher (to ~100%) and weak student.

Plain torch: completion-only cross-entropy on the assistant tokens and the
end-of-turn token, AdamW, right-padded batches drawn fresh from the task each
step (never from the held-out prompts).

* The teacher trains on words over the whole alphabet (at least 200 steps of
  batch 64, then until its greedy accuracy on a dev split reaches ``target``):
  ~100% on held-out prompts in ~30-40 s of one CPU thread (char tokenizer), or
  ~99% in ~70 s with the BPE tokenizer (``cross_tokenizer=True``).
* The student trains the same way (150 steps) but only on words over
  :data:`~axolotl_gold.demo.task.STUDENT_LETTERS`: it masters those, knows the
  output format and 18 of 26 cipher entries, and scores ~13-16% on the full task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time

from axolotl_gold.demo import task
from axolotl_gold.demo.models import (
    STUDENT_ARCH,
    TEACHER_ARCH,
    new_model,
    save_model,
    student_config,
    teacher_config,
    write_jsonl,
)
from axolotl_gold.demo.score import accuracy
from axolotl_gold.demo.tokenizers import build_bpe_tokenizer, build_char_tokenizer

BUILD_VERSION = 1

DEFAULTS = {
    "n_train": 4000,
    "n_eval": 200,
    "n_dev": 128,
    "batch_size": 64,
    "teacher": {"lr": 3e-3, "warmup": 20, "max_steps": 800, "decay": True, "eval_every": 25, "target": 0.99,
                "min_steps": 200, "max_seconds": 150, "letters": task.ALPHABET},
    "student": {"lr": 3e-3, "warmup": 20, "max_steps": 600, "decay": True, "eval_every": 25, "target": 1.0,
                "min_steps": 150, "max_seconds": 60, "letters": task.STUDENT_LETTERS},
    "weight_decay": 0.0,
    "threads": "auto",
}


def prompt_text(tokenizer, prompt: str) -> str:
    """The rendered chat prompt, ending with the generation prompt."""
    return tokenizer.apply_chat_template(task.to_messages(prompt), add_generation_prompt=True, tokenize=False)


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the full conversation and labels masked to the assistant turn."""
    return encode_batch(tokenizer, [(prompt, answer)])[0]


def encode_batch(tokenizer, examples) -> list[tuple[list[int], list[int]]]:
    """:func:`encode` for many examples with one batched tokenizer call each for prompts and conversations."""
    prompts = [prompt_text(tokenizer, p) for p, _ in examples]
    fulls = [pt + a + tokenizer.eos_token for pt, (_, a) in zip(prompts, examples)]
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    f_ids = tokenizer(fulls, add_special_tokens=False).input_ids
    out = []
    for pi, ids in zip(p_ids, f_ids):
        assert ids[: len(pi)] == pi, "chat template breaks the prompt-prefix property"
        out.append((ids, [-100] * len(pi) + ids[len(pi) :]))
    return out


def collate(tokenizer, examples):
    """Right-padded ``(input_ids, attention_mask, labels)`` tensors."""
    import torch

    enc = encode_batch(tokenizer, examples)
    width = max(len(i) for i, _ in enc)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for j, (i, l) in enumerate(enc):
        ids[j, : len(i)] = torch.tensor(i)
        labels[j, : len(l)] = torch.tensor(l)
        mask[j, : len(i)] = 1
    return ids, mask, labels


def sample_batch(rng: random.Random, n: int, exclude: set[str], letters: str = task.ALPHABET):
    out = []
    while len(out) < n:
        p, a = task.make_example(rng, letters)
        if p not in exclude:
            out.append((p, a))
    return out


def sft(model, tokenizer, *, lr, warmup, max_steps, eval_every, target, max_seconds, dev, exclude, decay=False, min_steps=0,
        batch_size=64, seed=0, weight_decay=0.0, letters=task.ALPHABET, log=print, name="model"):
    """Train until dev accuracy >= ``target`` (checked every ``eval_every`` steps, from ``min_steps`` on)
    or a budget (``max_steps``, ``max_seconds``) runs out.

    Training words use only ``letters``; ``dev`` should be drawn from the same letters.

    Returns ``(steps, dev_accuracy, seconds)``.
    """
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        if not decay:
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, max_steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    acc = 0.0
    step = 0
    for step in range(1, max_steps + 1):
        ids, mask, labels = collate(tokenizer, sample_batch(rng, batch_size, exclude, letters))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step % eval_every == 0 and step >= min_steps) or step == max_steps:
            acc = accuracy(model, tokenizer, dev)
            log(f"[{name}] step {step} loss {loss.item():.4f} dev_acc {acc:.3f} ({time.time() - t0:.1f}s)")
            if acc >= target or time.time() - t0 > max_seconds:
                break
    model.eval()
    return step, acc, time.time() - t0


def pick_threads(threads="auto") -> int:
    """``"auto"``: 2 threads on an idle machine, 1 when other processes keep the CPUs busy
    (tiny matmuls on oversubscribed cores run several times slower with 2 threads)."""
    cpus = os.cpu_count() or 1
    if threads == "auto":
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        return 1 if busy > 0.75 * cpus or cpus < 2 else 2
    return max(1, min(int(threads), cpus))


@contextlib.contextmanager
def _threads(n):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(pick_threads(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def build_demo(out_dir: str, seed: int = 0, cross_tokenizer: bool = False, force: bool = False,
               log=print, **overrides) -> dict:
    """Build (or reuse) the demo's trained teacher, weak student, data and ``scores.json``.

    Layout: ``out_dir/{teacher,student}/`` (model + tokenizer),
    ``out_dir/data/{train,eval}.jsonl`` and ``out_dir/scores.json``. If
    ``scores.json`` holds the same config hash and every output exists, nothing
    is rebuilt (and neither torch nor transformers is imported). Returns the
    contents of ``scores.json``. ``overrides`` replace entries of :data:`DEFAULTS`
    (dicts are merged), e.g. ``teacher={"max_steps": 50}``.
    """
    out_dir = os.path.abspath(out_dir)
    cfg = json.loads(json.dumps(DEFAULTS))
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    cfg.update(seed=seed, cross_tokenizer=cross_tokenizer, version=BUILD_VERSION, task=task.TASK_SPEC,
               teacher_arch=TEACHER_ARCH, student_arch=STUDENT_ARCH)
    h = config_hash(cfg)
    scores_path = os.path.join(out_dir, "scores.json")
    paths = {
        "teacher": os.path.join(out_dir, "teacher"),
        "student": os.path.join(out_dir, "student"),
        "train": os.path.join(out_dir, "data", "train.jsonl"),
        "eval": os.path.join(out_dir, "data", "eval.jsonl"),
    }
    if not force and os.path.exists(scores_path) and all(os.path.exists(p) for p in paths.values()):
        with open(scores_path) as f:
            scores = json.load(f)
        if scores.get("config_hash") == h:
            log(f"demo assets in {out_dir} are up to date (config {h})")
            return scores
    if os.path.exists(scores_path):
        os.remove(scores_path)  # written last: its presence marks a complete build
    for p in (paths["teacher"], paths["student"]):
        shutil.rmtree(p, ignore_errors=True)

    import torch

    t_start = time.time()
    with _threads(cfg["threads"]):
        eval_split = task.make_split(cfg["n_eval"], seed=10_000 + seed)
        held_out = {p for p, _ in eval_split}
        dev = {}
        for role in ("teacher", "student"):
            dev[role] = task.make_split(cfg["n_dev"], seed=30_000 + seed, exclude=held_out,
                                        alphabet=cfg[role]["letters"])
        exclude = held_out | {p for d in dev.values() for p, _ in d}
        train_split = task.make_split(cfg["n_train"], seed=20_000 + seed, exclude=exclude)
        write_jsonl(paths["train"], train_split)
        write_jsonl(paths["eval"], eval_split)

        student_tok = build_char_tokenizer()
        teacher_tok = build_bpe_tokenizer() if cross_tokenizer else student_tok
        log(f"building demo assets in {out_dir} (config {h}, {torch.get_num_threads()} threads)")

        teacher = new_model(teacher_config(teacher_tok), seed=seed)
        t_steps, _, t_secs = sft(teacher, teacher_tok, dev=dev["teacher"], exclude=exclude,
                                 batch_size=cfg["batch_size"], seed=seed, weight_decay=cfg["weight_decay"],
                                 log=log, name="teacher", **cfg["teacher"])
        student = new_model(student_config(student_tok), seed=seed + 1)
        s_steps, _, s_secs = sft(student, student_tok, dev=dev["student"], exclude=exclude,
                                 batch_size=cfg["batch_size"], seed=seed + 1, weight_decay=cfg["weight_decay"],
                                 log=log, name="student", **cfg["student"])
        teacher_acc = accuracy(teacher, teacher_tok, eval_split)
        student_acc = accuracy(student, student_tok, eval_split)
        save_model(teacher, teacher_tok, paths["teacher"])
        save_model(student, student_tok, paths["student"])

    scores = {
        "config_hash": h,
        "teacher": teacher_acc,
        "student": student_acc,
        "teacher_steps": t_steps,
        "student_steps": s_steps,
        "teacher_seconds": round(t_secs, 1),
        "student_seconds": round(s_secs, 1),
        "build_seconds": round(time.time() - t_start, 1),
        "cross_tokenizer": cross_tokenizer,
        "student_letters": cfg["student"]["letters"],
        "n_eval": len(eval_split),
        "n_train": len(train_split),
        "paths": paths,
        "config": cfg,
    }
    with open(scores_path, "w") as f:
        json.dump(scores, f, indent=2)
    log(f"teacher accuracy {teacher_acc:.3f} ({t_steps} steps), student accuracy {student_acc:.3f} "
        f"({s_steps} steps); built in {scores['build_seconds']}s")
    return scores
