"""The per-window objective: from both models' completion states to a loss SUM.

Sums, not means: the trainer divides once by the number of scored tokens of the
whole optimizer window across micro-steps and processes, so gradients do not
depend on how the window is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axolotl_gold.forward import CompletionStates
from axolotl_gold.losses import chunked_jsd_loss_sum, generalized_jsd_token_loss


@dataclass
class JsdObjective:
    """Generalized JSD between student and teacher on the same vocabulary.

    ``vocab_size`` is the shared tokenizer's size: when the two models pad their
    embedding matrices differently, only the real tokens are compared.
    """

    beta: float = 0.5
    temperature: float = 1.0
    chunk_size: int = 1024
    vocab_size: int | None = None

    def teacher_inputs(self, rows) -> None:
        return None  # same tokenizer: the teacher reads the student's tensors

    def count(self, batch: dict) -> int:
        return int((batch["completion_labels"] != -100).sum())

    def __call__(
        self, student: CompletionStates, teacher: CompletionStates, batch: dict
    ) -> torch.Tensor:
        """Loss summed over the batch's completion tokens (labels != -100)."""
        mask = batch["completion_labels"] != -100
        s_rows = student.values[mask]
        t_rows = teacher.values[mask].detach()
        v = self.vocab_size
        if student.head is not None and teacher.head is not None:
            return chunked_jsd_loss_sum(
                s_rows,
                student.head.weight[:v],
                t_rows,
                teacher.head.weight[:v].detach(),
                beta=self.beta,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                student_bias=_bias(student.head, v),
                teacher_bias=_bias(teacher.head, v),
            )
        s_logits = _logits(student, s_rows)[..., :v]
        t_logits = _logits(teacher, t_rows)[..., :v].detach()
        return generalized_jsd_token_loss(
            s_logits, t_logits, beta=self.beta, temperature=self.temperature
        ).sum()


def _bias(head, v):
    return None if head.bias is None else head.bias[:v]


def _logits(states: CompletionStates, rows: torch.Tensor) -> torch.Tensor:
    return rows if states.head is None else states.head(rows)
