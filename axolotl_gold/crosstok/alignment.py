"""Cross-tokenizer alignment: UTF-8 byte offsets per token and the byte-offset walk.

Student and teacher tokenize the same completion text differently. Each side's completion
tokens get ``(start, end)`` byte offsets relative to the completion text; the walk then groups
tokens so that each pair of groups covers the same bytes. One pair of groups is one aligned
position of the ULD loss (``axolotl_gold.losses.uld``).

Pure Python (no torch, no axolotl): this runs at alignment time, once per sequence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Offsets = list[tuple[int, int]]
Groups = list[list[int]]

__all__ = [
    "align_byte_offsets",
    "align_completion",
    "align_positional",
    "completion_byte_offsets",
    "ids_byte_offsets",
]


def align_byte_offsets(
    student_offsets: Sequence[Sequence[int]], teacher_offsets: Sequence[Sequence[int]]
) -> tuple[Groups, Groups]:
    """Group two tokenizations of one text at the byte boundaries they share.

    Walks both offset lists, always advancing the side whose current token ends earlier (both on
    a tie); a pair of groups closes whenever both sides end on the same byte. Tokens left over
    when one side runs out form one final pair, whose other side may be empty. Only the end
    offsets matter. This is the grouping of the reference's ``ULDLoss._align_by_byte_offsets``.

    Args:
        student_offsets, teacher_offsets: ``(start, end)`` UTF-8 byte offsets of one sequence's
            completion tokens, ends non-decreasing.

    Returns:
        ``(student_groups, teacher_groups)``: equally long lists of token-index lists; the
        groups of one side are consecutive and cover its tokens in order.
    """
    n_s, n_t = len(student_offsets), len(teacher_offsets)
    s_groups: Groups = []
    t_groups: Groups = []
    s_open = t_open = s = t = 0
    while s < n_s and t < n_t:
        s_end, t_end = student_offsets[s][1], teacher_offsets[t][1]
        if s_end <= t_end:
            s += 1
        if t_end <= s_end:
            t += 1
        if s_end == t_end:
            s_groups.append(list(range(s_open, s)))
            t_groups.append(list(range(t_open, t)))
            s_open, t_open = s, t
    if s < n_s or t < n_t:
        s_groups.append(list(range(s_open, n_s)))
        t_groups.append(list(range(t_open, n_t)))
    return s_groups, t_groups


def align_positional(num_student: int, num_teacher: int) -> tuple[Groups, Groups]:
    """One-to-one groups ``[k] <-> [k]`` truncated to the shorter side.

    The reference's ``use_extended_uld=False`` pairing, for tokenizers without offsets. It is
    only meaningful when both tokenizations happen to advance in step (near-identical vocabularies).
    """
    n = min(num_student, num_teacher)
    return [[k] for k in range(n)], [[k] for k in range(n)]


def align_completion(
    student_offsets: Sequence[Sequence[int]] | None,
    teacher_offsets: Sequence[Sequence[int]] | None,
    *,
    num_student: int | None = None,
    num_teacher: int | None = None,
    skip_student_eos: bool = False,
    skip_teacher_eos: bool = False,
) -> tuple[Groups, Groups]:
    """Aligned groups ready for the ULD loss: trim, walk, and drop one-sided pairs.

    Args:
        student_offsets, teacher_offsets: per-token byte offsets from
            :func:`completion_byte_offsets` / :func:`ids_byte_offsets`, or ``None`` for a
            tokenizer encoded with ``fallback="positional"``; then both sides are paired
            positionally and ``num_student`` / ``num_teacher`` give the token counts.
        skip_student_eos, skip_teacher_eos: leave that side's last token out of every group.
            The reference always drops it (``uld_skip_*_eos=True``), even from a completion cut
            at ``max_new_tokens`` that has no EOS; pass ``ids[-1] == eos_token_id`` instead.
            An EOS that is kept should carry the zero-width offset ``(n_bytes, n_bytes)``: two
            kept EOS tokens then form their own aligned pair.

    Returns:
        ``(student_groups, teacher_groups)`` with indices into the untrimmed token lists. Pairs
        whose student or teacher side is empty (tokens only one side has, such as a lone EOS)
        are dropped, as in the reference: they would merge to an all-zero distribution.
    """
    if student_offsets is None or teacher_offsets is None:
        n_s = len(student_offsets) if student_offsets is not None else num_student
        n_t = len(teacher_offsets) if teacher_offsets is not None else num_teacher
        if n_s is None or n_t is None:
            raise ValueError("Positional alignment needs `num_student` and `num_teacher` when offsets are None.")
        s_groups, t_groups = align_positional(n_s - int(skip_student_eos), n_t - int(skip_teacher_eos))
    else:
        s_off = list(student_offsets)[: len(student_offsets) - int(skip_student_eos)]
        t_off = list(teacher_offsets)[: len(teacher_offsets) - int(skip_teacher_eos)]
        s_groups, t_groups = align_byte_offsets(s_off, t_off)
    pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups, strict=True) if sg and tg]
    return [sg for sg, _ in pairs], [tg for _, tg in pairs]


# --------------------------------------------------------------------------------------------
# Byte offsets from a tokenizer


def completion_byte_offsets(
    tokenizer, text: str, *, fallback: Literal["positional"] | None = None
) -> tuple[list[int], Offsets | None]:
    """Encode a completion without special tokens; return its ids and UTF-8 byte offsets.

    Offsets are relative to ``text.encode("utf-8")`` and monotone (``start_k >= end_{k-1}``,
    ``end_k >= start_k``); text a tokenizer drops (BERT whitespace) is left as gaps.

    - Byte-level BPE (GPT-2, Llama-3, Qwen): offsets are rebuilt from the token pieces, which
      spell the bytes exactly. The tokenizer's own char offsets are not used there: with
      ``trim_offsets`` they give whitespace-only tokens a zero width and several tokens of one
      emoji the same span.
    - Other fast tokenizers (WordPiece, Unigram/SentencePiece with Metaspace, char-level): char
      offsets are mapped to bytes. Consecutive tokens with the same span (``<0xNN>`` byte
      fallback pieces of one character) are split into consecutive one-byte ranges when their
      byte lengths are known; otherwise all but the last become zero-width at the span start,
      so the walk keeps them in the group that contains the span.
    - Tokenizers without offsets (slow, pure-Python ones) raise ``ValueError``, unless
      ``fallback="positional"``: then the offsets are ``None`` and :func:`align_completion`
      pairs tokens by position (the reference's non-extended ULD).

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (or a ``tokenizers.Tokenizer``).
        text: the completion text, without the prompt.

    Returns:
        ``(token_ids, offsets)`` with one ``(start, end)`` byte pair per token.
    """
    if fallback not in (None, "positional"):
        raise ValueError(f'`fallback` must be None or "positional", got {fallback!r}.')
    backend = _backend(tokenizer)
    if backend is None:
        if fallback == "positional":
            return list(tokenizer.encode(text, add_special_tokens=False)), None
        raise ValueError(
            f"{type(tokenizer).__name__} has no offset mapping (not a fast tokenizer), so completion tokens "
            "cannot be placed on UTF-8 bytes for cross-tokenizer alignment. Load the fast tokenizer "
            '(`use_fast=True`), or pass `fallback="positional"` to pair tokens by position.'
        )
    enc = backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    text_bytes = text.encode("utf-8")
    if _is_byte_level(backend):
        offsets = _offsets_from_byte_pieces(enc.tokens, text_bytes)
        if offsets is not None:
            return ids, offsets
    return ids, _offsets_from_char_spans(enc.offsets, enc.tokens, text)


def ids_byte_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[Offsets, bytes]:
    """Byte offsets of given (for example sampled, non-canonical) ids of a byte-level tokenizer.

    Re-encoding decoded text need not reproduce sampled ids; this places the ids themselves.
    Special tokens (EOS, pad) get a zero-width offset at the current byte.

    Returns:
        ``(offsets, text_bytes)``: offsets relative to ``text_bytes``, the bytes the ids spell.
    """
    backend = _backend(tokenizer)
    if backend is None or not _is_byte_level(backend):
        raise ValueError(
            "ids_byte_offsets needs a fast byte-level BPE tokenizer; for other tokenizers decode the ids and use "
            "completion_byte_offsets on the text."
        )
    added = backend.get_added_tokens_decoder()  # id -> AddedToken, spelled in plain text
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    special |= {i for i, tok in added.items() if tok.special}
    offsets: Offsets = []
    chunks: list[bytes] = []
    cursor = 0
    for tid in (int(t) for t in token_ids):
        if tid in special:
            raw = b""
        elif tid in added:
            raw = added[tid].content.encode("utf-8")
        else:
            raw = _piece_bytes(backend.id_to_token(tid) or "") or b""
        offsets.append((cursor, cursor + len(raw)))
        chunks.append(raw)
        cursor += len(raw)
    return offsets, b"".join(chunks)


def _backend(tokenizer):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is not None:
        return tokenizer.backend_tokenizer
    return None


def _is_byte_level(backend) -> bool:
    return "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable-char table used by every byte-level BPE.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {ch: b for b, ch in _byte_to_unicode().items()}


def _piece_bytes(piece: str) -> bytes | None:
    try:
        return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
    except KeyError:
        return None


def _offsets_from_byte_pieces(pieces: Sequence[str], text_bytes: bytes) -> Offsets | None:
    """Tile the text with the pieces' bytes; ``None`` when they do not spell the text."""
    raws = [_piece_bytes(p) for p in pieces]
    if any(r is None for r in raws):
        return None
    spelled = b"".join(raws)
    # ByteLevel(add_prefix_space=True) spells one space the text does not have.
    phantom = 0
    if spelled != text_bytes:
        if spelled == b" " + text_bytes:
            phantom = 1
        else:
            return None
    offsets: Offsets = []
    cursor = -phantom
    for raw in raws:
        start, cursor = cursor, cursor + len(raw)
        offsets.append((max(start, 0), max(cursor, 0)))
    return offsets


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _offsets_from_char_spans(char_offsets: Sequence[tuple[int, int]], pieces: Sequence[str], text: str) -> Offsets:
    char_to_byte = [0] * (len(text) + 1)
    for i, ch in enumerate(text):
        char_to_byte[i + 1] = char_to_byte[i] + len(ch.encode("utf-8"))
    spans = [(char_to_byte[s], char_to_byte[e]) for s, e in char_offsets]

    # Runs of tokens sharing one span: several pieces of one character.
    i = 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and spans[j] == spans[i]:
            j += 1
        start, end = spans[i]
        if j - i > 1 and end > start:
            if all(_BYTE_FALLBACK.match(p) for p in pieces[i:j]) and j - i == end - start:
                spans[i:j] = [(start + k, start + k + 1) for k in range(j - i)]
            else:
                spans[i : j - 1] = [(start, start)] * (j - 1 - i)
        i = j

    offsets: Offsets = []
    cursor = 0
    for start, end in spans:
        start = max(start, cursor)
        end = max(end, start)
        offsets.append((start, end))
        cursor = end
    return offsets
