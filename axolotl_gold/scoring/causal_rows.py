"""Scoring rows moved left, so the forward's attention needs no padding mask.

A scoring batch (``data.batching``) pads each prompt on the left and each completion on the
right: ``[pad pad p0 p1 | c0 c1 pad]``. Its padding mask keeps SDPA off the flash kernel
(a mask rules it out) and on the memory-efficient one, which also computes the masked tiles
above the diagonal: on an H200 its backward and forward were 15% and 6% of the graphed
student's step (``benchmarks/results/profile_student_cudnn_h200_run18.txt``). Rolled left by
its count of leading pads, each row reads ``[p0 p1 c0 c1 pad pad pad]``: its tokens at columns
``0 .. L-1`` with the positions ``0 .. L-1`` they had (positions count real tokens only), and
plain causal attention gives every token exactly the keys the mask gave it, since the pads
now come after all of them (they attend to the row, and nothing reads them). So the model
runs without a mask, SDPA with ``is_causal`` (flash on CUDA, GQA without repeating the KV
heads), and the completion states are gathered back to the batch's columns. No pad query is
left attending to nothing, the case cuDNN's backward gets wrong (``trainer.attention_backends``).

HF builds a full causal mask anyway while ``torch.compile`` traces (``is_tracing`` turns off
its ``is_causal`` shortcut), which would keep the compiled student on the masked kernel. So
the forward runs under an attention implementation registered here: SDPA's own function,
without a mask function (HF then hands the layers no mask). Gradient checkpointing's
recomputation, after the forward, reads ``sdpa`` again: the same function, given the same
absent mask.

On a batch without padding HF's eager path already drops the mask; under ``torch.compile`` it
does not, and with padding neither does: there the roll is what brings the flash kernel (on an
H100 the CUDA-graphed student's side took 180.5 ms against 225.4 masked; one layer's attention,
forward and backward, 0.60x the masked kernel's time: ``benchmarks/bench_attention_layout.py``).

Rows are rolled only where that is exact and known to help: a local model whose layers are
all full attention over the batch (``data.attention_span``) under ``sdpa``, a text batch
(images bring their own positions), and the head bypassed (hidden states come back for
every column; logits would cost ``[B, T, V]``). Elsewhere the batch runs as laid out.
"""

from __future__ import annotations

import contextlib

import torch

from axolotl_gold.data.attention_span import layout_blocker

# the switch benchmarks flip to time the masked layout (benchmarks/student_variants.py)
ROLL_ROWS = True
CAUSAL_SDPA = "gold_causal_sdpa"


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def rolls(model, batch: dict, bypassed: bool) -> bool:
    """Whether ``completion_states`` runs ``batch`` through ``model`` (unwrapped: its config
    is read) with its rows moved left. Host-side only: no look at the device's tensors."""
    if not (ROLL_ROWS and bypassed) or batch.get("vision"):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if config.get_text_config(decoder=True) is not config:  # a vision-language model's own positions
        return False
    return layout_blocker(config, batch["input_ids"].shape[1]) is None


def rolled_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, T]`` ids with each row moved left by its leading pads, which wrap round to the
    end; ``[B]`` those counts). Each row's tokens must be one run of columns (the scoring
    batch's layout)."""
    lead = (attention_mask.cumsum(1) == 0).sum(1)
    width = input_ids.shape[1]
    columns = torch.arange(width, device=input_ids.device)
    return input_ids.gather(1, (columns + lead[:, None]) % width), lead


def completion_region(states: torch.Tensor, lead: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width, X]``: from a rolled forward's ``[B, T, X]`` states, those that predict each
    row's completion tokens, the batch's columns ``T - width - 1 .. T - 2`` moved left by
    ``lead`` as the row was. (A row without prompt tokens has no state before its first
    completion token; the modulo keeps its index in range, as the masked layout gave it a
    pad's state.)"""
    total = states.shape[1]
    columns = torch.arange(total - width - 1, total - 1, device=states.device)
    index = (columns[None, :] - lead.to(states.device)[:, None]) % total
    return states.gather(1, index[:, :, None].expand(-1, -1, states.shape[2]))


@contextlib.contextmanager
def causal_attention(config):
    """``config``'s layers on SDPA with no mask from HF inside (see the module's docstring);
    the implementation it had restored on exit."""
    before = config._attn_implementation
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before


_register()
