"""The teacher server's wire format (``gold-teacher/1``): safetensors bodies, no pickle,
no JSON arrays of numbers.

Request (``POST /hidden_states``), tensors:

- ``input_ids`` int32 ``[B, T]``: the teacher's own tokens (left-padded prompt + completion);
- ``attention_mask`` uint8 ``[B, T]``;
- ``position_ids`` int32 ``[B, T]`` (optional; the trainer always sends them);
- ``scored`` uint8 ``[B, C]``: the completion columns whose states are wanted. Column ``j``
  is the state that predicts completion token ``j``, i.e. sequence column ``T - C - 1 + j``
  (what ``scoring.forward.completion_states`` keeps).

Response, tensors: ``hidden_states`` ``[N, H]`` in the server's dtype, ``N = scored.sum()``,
in row-major order of ``scored``; metadata ``format``, ``num_states`` and ``head_sha256``
(every answer names the head it was computed for). Anything else is a ``PayloadError``.
"""

from __future__ import annotations

import hashlib

import torch

FORMAT = "gold-teacher/1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PayloadError(ValueError):
    """A request or an answer that does not follow ``gold-teacher/1``."""


def encode_request(batch: dict) -> bytes:
    """The body for ``POST /hidden_states`` from a scoring batch (``input_ids``,
    ``attention_mask``, optional ``position_ids``, ``completion_labels``: -100 = not scored)."""
    from safetensors.torch import save

    ids = batch["input_ids"]
    if ids.numel() and int(ids.max()) >= 2**31:
        raise PayloadError("token ids do not fit int32")
    tensors = {
        "input_ids": ids.to("cpu", torch.int32).contiguous(),
        "attention_mask": batch["attention_mask"].to("cpu", torch.uint8).contiguous(),
        "scored": (batch["completion_labels"] != -100).to("cpu", torch.uint8).contiguous(),
    }
    if batch.get("position_ids") is not None:
        tensors["position_ids"] = batch["position_ids"].to("cpu", torch.int32).contiguous()
    return save(tensors, metadata={"format": FORMAT})


def decode_request(body: bytes, vocab_size: int) -> dict:
    """The request's tensors as int64 / bool, checked (``PayloadError`` says what is wrong)."""
    tensors, metadata = _load(body, "request")
    if metadata.get("format") != FORMAT:
        raise PayloadError(f"request format {metadata.get('format')!r}, this server speaks {FORMAT!r}")
    for name in ("input_ids", "attention_mask", "scored"):
        if name not in tensors:
            raise PayloadError(f"request has no `{name}` tensor")
    extra = set(tensors) - {"input_ids", "attention_mask", "scored", "position_ids"}
    if extra:
        raise PayloadError(f"request has unknown tensors {sorted(extra)}")
    ids = tensors["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise PayloadError(f"`input_ids` must be an integer [B, T] tensor, got {ids.dtype} {list(ids.shape)}")
    batch, width = ids.shape
    for name in ("attention_mask", "position_ids"):
        t = tensors.get(name)
        if t is not None and (tuple(t.shape) != (batch, width) or t.dtype.is_floating_point):
            raise PayloadError(f"`{name}` must be an integer tensor of shape {[batch, width]}, got {t.dtype} {list(t.shape)}")
    scored = tensors["scored"]
    if scored.dim() != 2 or scored.shape[0] != batch or scored.dtype.is_floating_point:
        raise PayloadError(f"`scored` must be an integer [{batch}, C] tensor, got {scored.dtype} {list(scored.shape)}")
    if scored.shape[1] >= width:
        raise PayloadError(f"`scored` has {scored.shape[1]} completion columns; sequences have only {width}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise PayloadError(f"token ids must be in [0, {vocab_size}): got {int(ids.min())}..{int(ids.max())}")
    out = {
        "input_ids": ids.long(),
        "attention_mask": tensors["attention_mask"].long(),
        "scored": scored.bool(),
    }
    if "position_ids" in tensors:
        out["position_ids"] = tensors["position_ids"].long()
    return out


def encode_response(hidden_states: torch.Tensor, head_sha256: str) -> bytes:
    from safetensors.torch import save

    return save(
        {"hidden_states": hidden_states.detach().to("cpu").contiguous()},
        metadata={"format": FORMAT, "num_states": str(hidden_states.shape[0]), "head_sha256": head_sha256},
    )


def decode_response(body: bytes, num_states: int, hidden_size: int, head_sha256: str) -> torch.Tensor:
    """``[N, H]`` hidden states of an answer, or ``PayloadError`` for anything that is not
    exactly the answer asked for (a truncated body, another count, size, dtype or head)."""
    tensors, metadata = _load(body, "answer")
    if metadata.get("format") != FORMAT:
        raise PayloadError(f"answer format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("head_sha256") != head_sha256:
        raise PayloadError(
            f"the answer was computed with another output head (sha256 {metadata.get('head_sha256')}, "
            f"expected {head_sha256}): the server now serves another model"
        )
    states = tensors.get("hidden_states")
    if states is None or set(tensors) != {"hidden_states"}:
        raise PayloadError(f"answer holds {sorted(tensors)}, expected only `hidden_states`")
    if tuple(states.shape) != (num_states, hidden_size) or metadata.get("num_states") != str(num_states):
        raise PayloadError(
            f"answer has hidden states of shape {list(states.shape)} (num_states "
            f"{metadata.get('num_states')}), expected {[num_states, hidden_size]}"
        )
    if states.dtype not in DTYPES.values():
        raise PayloadError(f"answer has hidden states in {states.dtype}")
    if not torch.isfinite(states).all():
        raise PayloadError("answer has non-finite hidden states")
    return states


def _load(body: bytes, what: str) -> tuple[dict, dict]:
    from safetensors import safe_open  # noqa: F401  (the error types come from here)
    from safetensors.torch import load

    if not body:
        raise PayloadError(f"empty {what} body")
    try:
        tensors = load(body)
        metadata = _metadata(body)
    except PayloadError:
        raise
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise PayloadError(f"the {what} is not a complete safetensors body ({len(body)} bytes): {err}") from err
    return tensors, metadata


def _metadata(body: bytes) -> dict:
    import json
    import struct

    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def head_digest(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> str:
    """sha256 of the output head (weight, then bias) cast to ``dtype``: the server hashes its
    head in the dtype it runs, the trainer its local copy cast to the same dtype."""
    h = hashlib.sha256()
    for t in (weight, bias):
        if t is None:
            continue
        t = t.detach().to("cpu", dtype).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.flatten().view(torch.uint8).numpy().data)
    return h.hexdigest()
