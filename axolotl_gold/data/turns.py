"""Turns of a chat template: the ids that end one, and which turns fit a budget.

The stop set is one set for every engine and for ULD.

A model stops where its chat template ends an assistant turn, which is not always
``tokenizer.eos_token``: Gemma writes ``<end_of_turn>`` and has ``<eos>`` as its eos,
a Llama 3 base tokenizer has ``<|end_of_text|>`` while its template writes
``<|eot_id|>``. The stop set is the union of the tokenizer's eos, the model's
``generation_config.eos_token_id`` (an int or a list) and the template's turn end.
"""

from __future__ import annotations

_PROBE_USER = "GOLD_PROBE_QUESTION"
_PROBE_ANSWER = "GOLD_PROBE_ANSWER"


def text_tokenizer(tokenizer):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def special_ids(tokenizer) -> set[int]:
    tok = text_tokenizer(tokenizer)
    ids = set(getattr(tok, "all_special_ids", ()) or ())
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    ids |= {i for i, added in decoder.items() if getattr(added, "special", False)}
    return ids


def turn_end_id(tokenizer, template_kwargs: dict | None = None) -> int | None:
    """The first special token the chat template writes after an assistant turn.

    Rendered on a probe conversation; ``None`` when there is no template, the template
    refuses the probe, or it writes no special token after the answer.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    except Exception:  # noqa: BLE001 - a template may reject string content or roles
        return None
    if not isinstance(text, str) or _PROBE_ANSWER not in text:
        return None
    tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    tok = text_tokenizer(tokenizer)
    special = special_ids(tok)
    for token in tok(tail, add_special_tokens=False)["input_ids"]:
        if token in special:
            return int(token)
    return None


def end_of_completion_id(tokenizer, template_kwargs: dict | None = None) -> int | None:
    """The id a finished completion ends with: the template's turn end, else eos."""
    end = turn_end_id(tokenizer, template_kwargs)
    return end if end is not None else text_tokenizer(tokenizer).eos_token_id


def stop_token_ids(tokenizer, *generation_configs, template_kwargs: dict | None = None) -> set[int]:
    """Tokenizer eos + each ``generation_config.eos_token_id`` + the template's turn end."""
    ids = {text_tokenizer(tokenizer).eos_token_id, turn_end_id(tokenizer, template_kwargs)}
    for config in generation_configs:
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, (list, tuple, set)) else [eos])
    ids.discard(None)
    return {int(i) for i in ids}


def fit_prompt(
    render, messages: list[dict], budget: int
) -> tuple[list[dict], list[int]] | None:
    """The prompt without its earliest turns, so that its ids fit ``budget``.

    ``render(messages) -> ids``. Leading system messages stay; dropping starts at a user
    turn (templates that check alternation need one first). ``None`` when even the last
    user turn (with the system prompt) is too long.
    """
    ids = render(messages)
    if len(ids) <= budget:
        return messages, ids
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    for start in range(1, len(turns)):
        if turns[start]["role"] != "user":
            continue
        candidate = system + turns[start:]
        ids = render(candidate)
        if len(ids) <= budget:
            return candidate, ids
    return None
