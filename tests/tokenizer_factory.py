"""Small tokenizers built locally with the `tokenizers` library, for alignment and ULD tests.

Nothing is downloaded: each builder trains a tiny model on ``CORPUS`` (accents, CJK, emoji,
code, newlines) in well under a second and wraps it in ``PreTrainedTokenizerFast``. Builders
are cached, so a test session trains each tokenizer once.
"""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait, crème brûlée, naïve façade, déjà vu, Ångström, Straße, Øresund.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀 😃 🎉 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧 and 🚀 to the moon!",
    "def add(a, b):\n    return a + b  # adds two numbers\n",
    "for i in range(10):\n\tprint(i ** 2, end=' ')\n",
    "Mathematics: ∑ x² = 42, π ≈ 3.14159, √2 ≈ 1.414, α + β = γ.",
    "Привет, как дела? Всё хорошо, спасибо!",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया",
    "Numbers 1234567890 and dates 2024-01-31, prices $19.99 and €5,00.",
    "   leading spaces, trailing spaces   \n\n\nmultiple newlines\r\nand CRLF",
    "The answer is 7. Therefore, x = 7 and y = -3.5; z ∈ {1, 2, 3}.",
]

# Text for alignment tests: mostly in-corpus material plus out-of-vocabulary pieces (rare CJK,
# new emoji, combining marks) that force byte fallback or unknown tokens.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée — naïve déjà vu!",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 😀🎉👍🏽 🇫🇷 👨‍👩‍👧 🦜 rocket🚀!",
    "def f(x):\n    return x ** 2  # square\n",
    "  two leading spaces and trailing  ",
    "Combining: e\u0301 a\u0308 n\u0303, rare 龘 and 𠜎, math ∮ ≠ ∞.",
    "Привет мир! مرحبا — नमस्ते",
    "x",
    "\n\n",
]

SPECIAL_TOKENS = ["<unk>", "<pad>", "</s>"]


def _train(tokenizer: Tokenizer, trainer) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


@functools.cache
def byte_level_bpe(vocab_size: int = 400, add_prefix_space: bool = False) -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 / Qwen style byte-level BPE (no unknown tokens, emoji split into byte pieces)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return _wrap(_train(tok, trainer))


@functools.cache
def wordpiece() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece: NFD + lowercase + accent stripping, whitespace dropped from offsets."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False)
    return _wrap(_train(tok, trainer))


@functools.cache
def unigram_metaspace(byte_fallback: bool = True) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with a Metaspace pre-tokenizer and byte fallback (`<0xNN>` pieces)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    _train(tok, trainer)
    if byte_fallback:
        # The trainer has no byte-fallback switch: rebuild the model with it and the 256 byte pieces.
        vocab = [(piece, score) for piece, score in _unigram_vocab(tok)]
        known = {piece for piece, _ in vocab}
        vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256) if f"<0x{b:02X}>" not in known]
        tok.model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
    return _wrap(tok)


def _unigram_vocab(tok: Tokenizer) -> list[tuple[str, float]]:
    import json

    return [tuple(entry) for entry in json.loads(tok.to_str())["model"]["vocab"]]


@functools.cache
def char_level() -> PreTrainedTokenizerFast:
    """One token per Unicode character (unknown characters map to `<unk>`)."""
    chars = sorted({ch for line in CORPUS for ch in line})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return _wrap(tok)


class SlowCharTokenizer(PreTrainedTokenizer):
    """A pure-Python ("slow") character tokenizer: it has no offset mapping."""

    def __init__(self, **kwargs):
        chars = sorted({ch for line in CORPUS for ch in line})
        self._vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in chars:
            self._vocab.setdefault(ch, len(self._vocab))
        self._inv = {i: t for t, i in self._vocab.items()}
        super().__init__(unk_token="<unk>", pad_token="<pad>", eos_token="</s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self._inv.get(index, "<unk>")


ALL_FAST = {
    "byte_bpe_400": lambda: byte_level_bpe(400),
    "byte_bpe_700_prefix": lambda: byte_level_bpe(700, add_prefix_space=True),
    "wordpiece": wordpiece,
    "unigram_bytefallback": lambda: unigram_metaspace(True),
    "unigram_plain": lambda: unigram_metaspace(False),
    "char": char_level,
}
