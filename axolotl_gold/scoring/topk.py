"""The objective against a teacher known by its top-k log-probabilities (a vLLM server's
``prompt_logprobs``, ``models/remote/prompt_logprobs.py``): the top-k + tail generalized JSD
(``losses/topk_tail.py``), summed over the batch's completion tokens like ``JsdObjective``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axolotl_gold.config.schema import LOSS_CHUNK_SIZE
from axolotl_gold.data.batching import completion_token_count, scored_row_weights, scored_rows
from axolotl_gold.losses.topk_tail import topk_tail_loss_sum
from axolotl_gold.scoring.forward import CompletionStates, first_rows


@dataclass
class TopKStates:
    """The teacher's completion region as ``[B, C, K]`` token ids (-1: padding) and their
    log-probabilities at temperature 1; what ``completion_states`` gives for such a teacher."""

    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class TopKTailObjective:
    """Generalized JSD between the student's full distribution collapsed onto the teacher's
    listed ids plus one tail bucket, and the teacher's top-k plus its remaining mass."""

    beta: float
    temperature: float
    chunk_size: int = LOSS_CHUNK_SIZE
    vocab_size: int | None = None  # the compared vocabulary (student head rows beyond it dropped)

    def teacher_inputs(self, rows) -> None:
        return None  # same tokenizer: the teacher reads the student's tokens

    def count(self, batch: dict) -> int:
        return completion_token_count(batch)

    def __call__(self, student: CompletionStates, teacher: TopKStates, batch: dict) -> torch.Tensor:
        if not isinstance(teacher, TopKStates):
            raise TypeError("TopKTailObjective scores a top-k teacher (`teacher_server_mode: prompt_logprobs`)")
        weights = batch.get("row_weights")
        token_weights = None if weights is None else scored_row_weights(weights, batch)
        v = self.vocab_size
        rows = scored_rows(student.values, batch)
        weight = bias = None
        if student.head is not None:
            weight = first_rows(student.head_weight(), v)
            bias = first_rows(student.head_bias(), v)
        else:
            rows = first_rows(rows, v, dim=-1)
        return topk_tail_loss_sum(
            rows, weight, scored_rows(teacher.ids, batch), scored_rows(teacher.logprobs, batch), beta=self.beta,
            temperature=self.temperature, chunk_size=self.chunk_size, student_bias=bias,
            weights=token_weights,
        )
