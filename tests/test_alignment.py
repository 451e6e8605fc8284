"""Byte offsets and the byte-offset walk, against the reference (trl.experimental.gold)."""

import os
import random
import sys
from pathlib import Path

import pytest

from axolotl_gold.crosstok.alignment import (
    align_byte_offsets,
    align_completion,
    align_positional,
    completion_byte_offsets,
    ids_byte_offsets,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenizer_factory as tf  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def reference_walk():
    from trl.experimental.gold.gold_trainer import ULDLoss

    return ULDLoss._align_by_byte_offsets


def _random_offsets(rng: random.Random, n_bytes: int, zero_width: float) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_bytes), rng.randint(0, n_bytes - 1))) if n_bytes > 1 else []
    bounds = [0, *cuts, n_bytes] if n_bytes else [0]
    offsets = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        while rng.random() < zero_width:  # zero-width tokens (trimmed spaces, EOS)
            offsets.append((start, start))
        offsets.append((start, end))
    return offsets


def test_walk_matches_reference_on_random_cases(reference_walk):
    rng = random.Random(0)
    for case in range(3000):
        n_bytes = rng.randint(0, 30)
        s = _random_offsets(rng, n_bytes, zero_width=0.1 * (case % 3))
        # The other side may cover fewer or more bytes (dropped whitespace, truncation), or end in EOS.
        t = _random_offsets(rng, max(0, n_bytes + rng.choice([0, 0, 0, -2, 3])), zero_width=0.05)
        if rng.random() < 0.3:
            s.append((n_bytes, n_bytes))
        if rng.random() < 0.3:
            t.append((t[-1][1] if t else 0,) * 2)
        assert align_byte_offsets(s, t) == reference_walk(s, t), (s, t)


def test_walk_edge_cases(reference_walk):
    for s, t in [([], []), ([(0, 3)], []), ([], [(0, 1)]), ([(0, 0)], [(0, 0)]), ([(0, 2), (2, 4)], [(0, 4)])]:
        assert align_byte_offsets(s, t) == reference_walk(s, t)
    assert align_byte_offsets([(0, 2), (2, 4)], [(0, 1), (1, 4)]) == ([[0, 1]], [[0, 1]])
    assert align_byte_offsets([(0, 2), (2, 4)], [(0, 2), (2, 3)]) == ([[0], [1]], [[0], [1]])


PAIRS = [
    ("byte_bpe_400", "byte_bpe_700_prefix"),
    ("byte_bpe_400", "unigram_bytefallback"),
    ("byte_bpe_700_prefix", "wordpiece"),
    ("unigram_plain", "char"),
    ("char", "byte_bpe_400"),
    ("wordpiece", "unigram_bytefallback"),
]


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_walk_matches_reference_on_real_tokenizers(student, teacher, reference_walk):
    s_tok, t_tok = tf.ALL_FAST[student](), tf.ALL_FAST[teacher]()
    for text in tf.SAMPLE_TEXTS:
        _, s_off = completion_byte_offsets(s_tok, text)
        _, t_off = completion_byte_offsets(t_tok, text)
        s_groups, t_groups = align_byte_offsets(s_off, t_off)
        assert (s_groups, t_groups) == reference_walk(s_off, t_off)
        # Every closed pair of groups ends on the same byte on both sides.
        for sg, tg in list(zip(s_groups, t_groups, strict=True))[:-1]:
            assert s_off[sg[-1]][1] == t_off[tg[-1]][1]


@pytest.mark.parametrize("name", sorted(tf.ALL_FAST))
def test_offsets_are_bytes_of_the_text(name):
    tok = tf.ALL_FAST[name]()
    tiles = name != "wordpiece"  # WordPiece drops whitespace: gaps are allowed there
    for text in tf.SAMPLE_TEXTS:
        ids, offsets = completion_byte_offsets(tok, text)
        raw = text.encode("utf-8")
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert len(offsets) == len(ids)
        cursor = 0
        for start, end in offsets:
            assert cursor <= start <= end <= len(raw)
            if tiles:
                assert start == cursor
            cursor = end
        if tiles and ids:
            assert cursor == len(raw)


def test_byte_level_offsets_spell_each_piece():
    from axolotl_gold.crosstok.alignment import _piece_bytes

    tok = tf.byte_level_bpe(400)
    for text in tf.SAMPLE_TEXTS:
        ids, offsets = completion_byte_offsets(tok, text)
        raw = text.encode("utf-8")
        assert [raw[s:e] for s, e in offsets] == [_piece_bytes(p) for p in tok.convert_ids_to_tokens(ids)]


def test_multibyte_char_offsets_exact():
    text = "é東😀 x"
    _, offsets = completion_byte_offsets(tf.char_level(), text)
    assert offsets == [(0, 2), (2, 5), (5, 9), (9, 10), (10, 11)]
    # Prefix-space byte-level BPE: the phantom space is not part of the text.
    _, offsets = completion_byte_offsets(tf.byte_level_bpe(700, add_prefix_space=True), "Café")
    assert offsets[0][0] == 0 and offsets[-1][1] == len("Café".encode())


def test_byte_fallback_pieces_get_one_byte_each():
    tok = tf.unigram_metaspace(byte_fallback=True)
    ids, offsets = completion_byte_offsets(tok, "a龘")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-3:] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert offsets[-3:] == [(1, 2), (2, 3), (3, 4)]


def test_identical_spans_without_known_lengths_stay_in_one_group():
    from axolotl_gold.crosstok.alignment import _offsets_from_char_spans

    # Two pieces share the span of one 4-byte character: the first becomes zero-width.
    offsets = _offsets_from_char_spans([(0, 1), (1, 2), (1, 2), (2, 3)], ["a", "x", "y", "b"], "a😀b")
    assert offsets == [(0, 1), (1, 1), (1, 5), (5, 6)]
    assert align_byte_offsets(offsets, [(0, 1), (1, 5), (5, 6)]) == ([[0], [1, 2], [3]], [[0], [1], [2]])


def test_reference_byte_offsets_misplace_whitespace_tokens():
    """The reference derives byte-level offsets from trimmed char offsets: whitespace-only tokens
    get zero width (``'ĊĠĠĠ'`` ends at byte 10 instead of 13), so groups close at wrong bytes.
    Ours spell every piece."""
    from trl.experimental.utils import encode_with_byte_offsets

    tok = tf.byte_level_bpe(700, add_prefix_space=True)
    text = "def f(x):\n    return x"
    ids, ours = completion_byte_offsets(tok, text)
    (ref_ids, ref), = encode_with_byte_offsets(tok.backend_tokenizer, [text])
    assert ids == list(ref_ids)
    k = tok.convert_ids_to_tokens(ids).index("ĊĠĠĠ")
    assert ours[k] == (9, 13)
    assert tuple(ref[k])[1] == 10


def test_slow_tokenizer_needs_positional_fallback():
    slow = tf.SlowCharTokenizer()
    with pytest.raises(ValueError, match="no offset mapping"):
        completion_byte_offsets(slow, "héllo")
    ids, offsets = completion_byte_offsets(slow, "héllo", fallback="positional")
    assert offsets is None and len(ids) == 5
    with pytest.raises(ValueError):
        completion_byte_offsets(slow, "x", fallback="bytes")
    _, t_off = completion_byte_offsets(tf.char_level(), "héllo")
    assert align_completion(offsets, t_off, num_student=len(ids)) == align_positional(5, 5)


def test_align_completion_eos_and_one_sided_pairs():
    s = [(0, 2), (2, 5), (5, 5)]  # last: EOS
    t = [(0, 5), (5, 5)]
    assert align_completion(s, t) == ([[0, 1], [2]], [[0], [1]])  # EOS pairs with EOS
    assert align_completion(s, t, skip_student_eos=True, skip_teacher_eos=True) == ([[0, 1]], [[0]])
    # Only the student keeps its EOS: the leftover pair has an empty teacher side and is dropped.
    assert align_completion(s, t, skip_teacher_eos=True) == ([[0, 1]], [[0]])
    assert align_positional(3, 2) == ([[0], [1]], [[0], [1]])


def test_ids_byte_offsets_places_sampled_ids():
    tok = tf.byte_level_bpe(400)
    text = "Café 😀 東京"
    ids, offsets = completion_byte_offsets(tok, text)
    assert ids_byte_offsets(tok, ids) == (offsets, text.encode("utf-8"))
    # A non-canonical sampling: every byte its own token, then EOS.
    single = [tok.convert_tokens_to_ids(ch) for ch in "".join(tok.convert_ids_to_tokens(ids))]
    single.append(tok.eos_token_id)
    offs, raw = ids_byte_offsets(tok, single)
    n = len(text.encode("utf-8"))
    assert raw == text.encode("utf-8")
    assert offs == [(i, i + 1) for i in range(n)] + [(n, n)]
    with pytest.raises(ValueError):
        ids_byte_offsets(tf.wordpiece(), [5])


def test_ids_byte_offsets_spells_added_tokens_literally():
    tok = tf.byte_level_bpe.__wrapped__(400)  # a private copy: tokens are added below
    tok.add_tokens(["<tëst>"])
    tid = tok.convert_tokens_to_ids("<tëst>")
    ids = tok("a<tëst>b", add_special_tokens=False)["input_ids"]
    assert tid in ids
    offsets, raw = ids_byte_offsets(tok, ids)
    assert raw == "a<tëst>b".encode("utf-8")
    assert completion_byte_offsets(tok, "a<tëst>b") == (ids, offsets)
