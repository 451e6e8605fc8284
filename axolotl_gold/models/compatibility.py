"""Can this teacher be distilled into this student? Checked on configs and tokenizers
before any model loads (and on the tokenizers as Axolotl loaded them), so a mismatch
is a configuration error that names the key, never a failure mid-training."""

from __future__ import annotations

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.turns import text_tokenizer


def check_teacher_compatible(cfg) -> None:
    """Fail before any model loads when the teacher cannot be distilled from.

    Reads only configs and tokenizers. Same-tokenizer JSD needs the same
    vocabulary on both sides; the teacher's embeddings are never resized.
    """
    from transformers import AutoConfig, AutoTokenizer

    teacher = cfg["teacher_model"]
    revision = cfg.get("teacher_model_revision")
    try:
        teacher_config = AutoConfig.from_pretrained(teacher, revision=revision)
    except (OSError, ValueError) as err:
        raise GoldConfigError(
            f"`teacher_model: {teacher}` cannot be loaded ({err}). Set `teacher_model` to "
            "a local model folder or a hub id (and `teacher_model_revision` if needed)."
        ) from err
    teacher_tok_path = cfg.get("teacher_tokenizer") or teacher
    try:
        teacher_tok = AutoTokenizer.from_pretrained(teacher_tok_path, revision=revision)
    except (OSError, ValueError) as err:
        raise GoldConfigError(
            f"the teacher tokenizer `{teacher_tok_path}` cannot be loaded ({err}): set "
            "`teacher_tokenizer` to a folder or hub id that holds the teacher's tokenizer."
        ) from err
    if cfg.get("processor_type"):
        from axolotl_gold.vision.setup import check_vision_pair

        check_vision_pair(cfg, teacher_config)
    if cfg.get("use_uld_loss"):
        return
    student_tok = AutoTokenizer.from_pretrained(
        cfg.get("tokenizer_config") or cfg["base_model"]
    )
    student_config = AutoConfig.from_pretrained(cfg.get("base_model_config") or cfg["base_model"])
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise GoldConfigError(
            "the teacher and the student use different tokenizers "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens, or the same size with "
            "different token ids), so their next-token distributions cannot be compared "
            "token by token: set `use_uld_loss: true` for cross-tokenizer distillation."
        )
    tv = text_config(teacher_config).vocab_size
    sv = text_config(student_config).vocab_size
    if min(tv, sv) < len(student_tok):
        raise GoldConfigError(
            f"a model's vocab_size ({min(tv, sv)}) is smaller than the tokenizer "
            f"({len(student_tok)} tokens): check `teacher_model` and `base_model`."
        )


def check_runtime_tokens(cfg, student_tokenizer) -> None:
    """Tokens Axolotl added to the student's tokenizer (``special_tokens``, ``tokens``)
    must be the teacher's too (same-tokenizer JSD); checked before the teacher loads."""
    from transformers import AutoTokenizer


    if not runtime_added_tokens(cfg):
        return
    teacher_tok = AutoTokenizer.from_pretrained(
        cfg.get("teacher_tokenizer") or cfg["teacher_model"],
        revision=cfg.get("teacher_model_revision"),
    )
    check_added_tokens(cfg, text_tokenizer(student_tokenizer), teacher_tok)


def runtime_added_tokens(cfg) -> list[tuple[str, str]]:
    """``(key, token)`` for each token Axolotl adds to the student's tokenizer at load time.

    ``special_tokens.<name>`` (``additional_special_tokens`` a list) and ``tokens``.
    """
    out = []
    special = cfg.get("special_tokens") or {}
    special = special.to_dict() if hasattr(special, "to_dict") else dict(special)
    for name, value in special.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [(f"special_tokens.{name}", str(v)) for v in values if v is not None]
    out += [("tokens", str(t)) for t in cfg.get("tokens") or []]
    return out


def check_added_tokens(cfg, student_tokenizer, teacher_tokenizer) -> None:
    """Same-tokenizer JSD: each token added at run time has the same id in the teacher.

    Checked on the tokenizers as loaded (the student's after Axolotl added the tokens);
    the teacher's embeddings are never resized, so a new token has no teacher logit.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    for key, token in runtime_added_tokens(cfg):
        if teacher_vocab.get(token) is None or teacher_vocab.get(token) != student_vocab.get(token):
            raise GoldConfigError(
                f"`{key}` adds {token!r} to the student's tokenizer, which the teacher's "
                "vocabulary does not have at the same id, so the teacher has no logit for it: "
                f"remove it from `{key.split('.')[0]}`, use a token both vocabularies have, or "
                "set `use_uld_loss: true` for different vocabularies."
            )


def shared_vocab_size(student, teacher) -> int | None:
    """The compared vocabulary when embedding matrices are padded differently."""
    sv = text_config(student.config).vocab_size
    tv = text_config(teacher.config).vocab_size
    return None if sv == tv else min(sv, tv)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config
