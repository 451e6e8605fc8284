"""Local tokenizers for the demo and the tests (built offline, in well under a second).

* :func:`build_char_tokenizer`: one token per character (a byte-level BPE with
  no merges: 6 special tokens + 256 byte symbols, a space is ``Ġ``), special
  tokens ``<|pad|> <|user|> <|assistant|> <|end|> <|system|> <|unk|>``, chat
  template ``<|user|>{u}<|assistant|>{a}<|end|>``.
* :func:`build_bpe_tokenizer`: a byte-level BPE trained on the task corpus (320
  tokens, merges such as ``encode``, ``Ġa`` and some letter pairs), special tokens ``<s> </s>
  <pad> [INST] [/INST] [SYS] [/SYS] <unk>`` and chat template
  ``<s>[INST]{u}[/INST]{a}</s>``. Used as the teacher's tokenizer in
  cross-tokenizer (ULD) demos and tests.

Both have the prefix property the trainer relies on: the ids of
``apply_chat_template(prompt_msgs, add_generation_prompt=True)`` are a prefix of
the ids of the same string followed by the answer and the end-of-turn token, and
both return character offsets (``return_offsets_mapping=True``). The assistant
turn is wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask`` works.

Both are byte-level BPEs shaped exactly like transformers' ``Qwen2Tokenizer``
(see :data:`QWEN2_PRETOKENIZE_REGEX`), so ``AutoTokenizer`` gives the same ids
whether it loads them as ``TokenizersBackend`` or, next to a qwen2 ``config.json``,
as ``Qwen2Tokenizer``.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CHAR_SPECIAL = {
    "pad": "<|pad|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
    "system": "<|system|>",
    "unk": "<|unk|>",
}

CHAR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

BPE_SPECIAL = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "inst": "[INST]",
    "inst_end": "[/INST]",
    "sys": "[SYS]",
    "sys_end": "[/SYS]",
    "unk": "<unk>",
}

BPE_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "[SYS]{{ message['content'] }}[/SYS]"
    "{%- elif message['role'] == 'user' -%}"
    "[INST]{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "[/INST]{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}[/INST]{%- endif -%}"
)

# Both tokenizers are byte-level BPEs in the exact shape of transformers'
# ``Qwen2Tokenizer`` (NFC, Qwen's split regex, ByteLevel without its own regex,
# ByteLevel decoder). transformers 5 loads *any* tokenizer saved next to a qwen2
# ``config.json`` as ``Qwen2Tokenizer`` and rebuilds the pipeline from vocab and
# merges; building ours the same way makes every loading path give the same ids.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# 256 bytes + 8 specials + 56 merges ("encode", "Ġa".."Ġz", and ~25 letter pairs):
# about 15% of answers contain a two-letter token, so teacher and student
# tokenizations differ on completions as well as prompts, while the BPE teacher
# still learns the task to ~99% in a minute or so.
BPE_VOCAB_SIZE = 320


def _qwen2_style(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _bpe(vocab, merges):
    # same model arguments as transformers' Qwen2Tokenizer
    return models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )


def _finish(tok_obj: Tokenizer, out_dir: str | None, chat_template: str, **special):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok_obj,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **special,
    )
    hf.chat_template = chat_template
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
        portable_tokenizer_config(out_dir, chat_template)
    return hf


def portable_tokenizer_config(out_dir: str, chat_template: str) -> None:
    """Rewrite ``tokenizer_config.json`` so transformers 4.x and 5.x load the same tokenizer.

    ``tokenizer_class`` is ``Qwen2Tokenizer`` (what transformers 5 uses next to a
    qwen2 config anyway; transformers 4.x maps it to ``Qwen2TokenizerFast``, which
    reads ``tokenizer.json`` as is), the chat template is inlined, and the extra
    special tokens are listed under the 4.x name ``additional_special_tokens``.
    """
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["add_prefix_space"] = False
    cfg.setdefault("chat_template", chat_template)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg.setdefault("additional_special_tokens", extra)
        cfg.pop("extra_special_tokens")  # transformers 4.x expects a dict under this name
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def build_char_tokenizer(out_dir: str | None = None):
    """A character-level ``PreTrainedTokenizerFast`` (one token per byte, no merges).

    Saved to ``out_dir`` if given.
    """
    specials = list(CHAR_SPECIAL.values())
    vocab = {t: i for i, t in enumerate(specials)}
    for c in _byte_alphabet():
        vocab.setdefault(c, len(vocab))
    tok = _qwen2_style(_bpe(vocab, []))
    tok.add_special_tokens(specials)
    return _finish(
        tok,
        out_dir,
        CHAR_CHAT_TEMPLATE,
        pad_token=CHAR_SPECIAL["pad"],
        eos_token=CHAR_SPECIAL["end"],
        unk_token=CHAR_SPECIAL["unk"],
        additional_special_tokens=[CHAR_SPECIAL[k] for k in ("user", "assistant", "system")],
    )


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in byte order (GPT-2's ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_bpe_tokenizer(out_dir: str | None = None, vocab_size: int = BPE_VOCAB_SIZE, corpus_seed: int = 12345):
    """A byte-level BPE trained on the task corpus (deterministic); saved to ``out_dir`` if given."""
    from axolotl_gold.demo import task

    specials = list(BPE_SPECIAL.values())
    tok = _qwen2_style(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    lines = task.corpus(4000, corpus_seed)
    # answers appear right after [/INST] with no leading space: train on them alone too
    lines += [line.rsplit(" ", 1)[1] for line in lines]
    tok.train_from_iterator(lines, trainer=trainer)
    # re-create the model with Qwen2Tokenizer's exact BPE arguments
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    out = _qwen2_style(_bpe(data["model"]["vocab"], merges))
    out.add_special_tokens(specials)
    return _finish(
        out,
        out_dir,
        BPE_CHAT_TEMPLATE,
        bos_token=BPE_SPECIAL["bos"],
        eos_token=BPE_SPECIAL["eos"],
        pad_token=BPE_SPECIAL["pad"],
        unk_token=BPE_SPECIAL["unk"],
        additional_special_tokens=[BPE_SPECIAL[k] for k in ("inst", "inst_end", "sys", "sys_end")],
    )


def build_tokenizer(kind: str, out_dir: str | None = None):
    if kind == "char":
        return build_char_tokenizer(out_dir)
    if kind == "bpe":
        return build_bpe_tokenizer(out_dir)
    raise ValueError(f"unknown tokenizer kind {kind!r}")
