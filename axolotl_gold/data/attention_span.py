"""Which attention a model's layers compute, as far as the token layout is concerned.

A sliding-window layer attends to the last ``sliding_window`` columns only. When the window
is at least the whole sequence it attends to what a full layer would, so code that lays out
its own columns (the static engine's cache, the scoring forward's rows moved left) may treat
it as full; a narrower window needs HF's own sliding mask."""

from __future__ import annotations


def layout_blocker(config, total_len: int) -> str | None:
    """Why ``config``'s layers are not all full causal attention over ``total_len`` columns
    (other layer types, or a sliding window narrower than them), or None."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = set(layer_types) - {"full_attention"}
    if other - {"sliding_attention"}:
        return f"layer types {sorted(other)}"
    window = getattr(config, "sliding_window", None)
    if other and window is not None and window < total_len:
        return f"sliding_window {window} < prompt + completion columns {total_len}"
    return None
