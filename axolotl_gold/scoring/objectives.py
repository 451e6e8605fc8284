"""The per-window objective: from both models' completion states to a loss SUM.

Sums, not means: the trainer divides once by the number of scored tokens of the
whole optimizer window across micro-steps and processes, so gradients do not
depend on how the window is split.

A batch may carry ``row_weights`` ``[B]`` (integer repeat counts of merged rows): each
row's terms then count that many times, in the sum and in ``count``. The loss
kernels stay unweighted: rows are scored in one call per distinct weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axolotl_gold.config.schema import LOSS_CHUNK_SIZE
from axolotl_gold.data.batching import ROW_COUNTS, completion_token_count, scored_rows, weight_groups
from axolotl_gold.losses import fused_jsd_loss_sum, generalized_jsd_token_loss
from axolotl_gold.scoring.forward import CompletionStates, first_rows


@dataclass
class JsdObjective:
    """Generalized JSD between student and teacher on the same vocabulary.

    ``vocab_size`` is the shared tokenizer's size: when the two models pad their
    embedding matrices differently, only the real tokens are compared.
    """

    beta: float
    temperature: float
    chunk_size: int = LOSS_CHUNK_SIZE
    vocab_size: int | None = None
    backend: str = "torch"  # or "liger" / "auto" (Liger's fused linear JSD on CUDA)

    def teacher_inputs(self, rows) -> None:
        return None  # same tokenizer: the teacher reads the student's tensors

    def count(self, batch: dict) -> int:
        return completion_token_count(batch)

    def __call__(
        self, student: CompletionStates, teacher: CompletionStates, batch: dict
    ) -> torch.Tensor:
        """Loss summed over the batch's completion tokens (labels != -100), each
        row's tokens times its ``row_weights`` entry when the batch has one."""
        s_rows = scored_rows(student.values, batch)
        t_rows = scored_rows(teacher.values, batch).detach()
        weights = batch.get("row_weights")
        if weights is None:
            return self._sum(student, teacher, s_rows, t_rows)
        groups = weight_groups(batch)
        if len(groups) <= 1:
            scale = groups[0][0] if groups else 1
            return scale * self._sum(student, teacher, s_rows, t_rows)
        total = 0
        for w, index in groups:
            index = index.to(s_rows.device)
            total = total + w * self._sum(student, teacher, s_rows.index_select(0, index),
                                          t_rows.index_select(0, index))
        return total

    def _sum(self, student, teacher, s_rows, t_rows) -> torch.Tensor:
        v = self.vocab_size
        if student.head is not None and teacher.head is not None:
            # the student's head as it is (a float32 master under bf16 autocast: the loss
            # computes in ``compute_dtype`` and hands back a float32 gradient)
            bias = student.head.bias
            return fused_jsd_loss_sum(
                s_rows,
                first_rows(student.head.weight, v),
                t_rows,
                first_rows(teacher.head_weight(), v).detach(),
                beta=self.beta,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                student_bias=first_rows(bias, v),
                teacher_bias=_bias(teacher, v),
                backend=self.backend,
                compute_dtype=student.compute_dtype,
            )
        s_logits = first_rows(_logits(student, s_rows), v, dim=-1)
        t_logits = first_rows(_logits(teacher, t_rows), v, dim=-1).detach()
        return generalized_jsd_token_loss(
            s_logits, t_logits, beta=self.beta, temperature=self.temperature
        ).sum()


def _bias(states: CompletionStates, v):
    return first_rows(states.head_bias(), v)



def _logits(states: CompletionStates, rows: torch.Tensor) -> torch.Tensor:
    if states.head is None:
        return rows
    weight = states.head_weight()
    return torch.nn.functional.linear(rows.to(weight.dtype), weight, states.head_bias())


@dataclass
class UldObjective:
    """ULD / hybrid ULD between models with different tokenizers.

    ``inputs`` builds the teacher's tokens and the alignment per slice; the unit of
    normalization is the aligned position.
    """

    inputs: object  # axolotl_gold.crosstok.teacher_inputs.CrossTokenizerInputs
    config: object  # axolotl_gold.losses.uld.ULDConfig
    mapping: object | None = None  # a VocabMapping switches hybrid ULD on

    def teacher_inputs(self, rows) -> dict:
        return self.inputs(rows)

    def count(self, batch: dict) -> int:
        weights = _row_weights(batch)
        return sum(len(g) * w for g, w in zip(batch["uld_student_groups"], weights))

    def __call__(
        self, student: CompletionStates, teacher: CompletionStates, batch: dict
    ) -> torch.Tensor:
        for name, states in (("student", student), ("teacher", teacher)):
            if states.head is None or states.head.bias is not None:
                raise ValueError(
                    f"`use_uld_loss` needs the {name}'s output head as a plain bias-free "
                    "nn.Linear (it computes logits chunk by chunk): remove `lm_head` from "
                    "`lora_target_modules` / `lora_modules_to_save`, or set `use_uld_loss: false`."
                )
        weights = _row_weights(batch)
        distinct = sorted(set(weights))
        if len(distinct) <= 1:
            scale = distinct[0] if distinct else 1
            return scale * self._sum(student, teacher, batch, None)
        total = 0
        for w in distinct:
            rows = [i for i, x in enumerate(weights) if x == w]
            total = total + w * self._sum(student, teacher, batch, rows)
        return total

    def _sum(self, student, teacher, batch: dict, rows: list[int] | None) -> torch.Tensor:
        from axolotl_gold.losses.uld_fused import uld_loss_sum

        def take(x):
            if rows is None:
                return x
            return x[rows] if isinstance(x, torch.Tensor) else [x[i] for i in rows]

        total, _ = uld_loss_sum(
            take(student.values),
            student.head.weight,  # the master, computed in ``compute_dtype`` (see JsdObjective)
            take(teacher.values.detach()),
            teacher.head_weight().detach(),
            take(batch["uld_student_ids"]),
            take(batch["uld_teacher_ids"]),
            take(batch["uld_student_groups"]),
            take(batch["uld_teacher_groups"]),
            config=self.config,
            mapping=self.mapping,
            compute_dtype=student.compute_dtype,
        )
        return total


def _row_weights(batch: dict) -> list[int]:
    weights = batch.get("row_weights")
    if weights is None:
        return [1] * len(batch["uld_student_groups"])
    counts = batch.get(ROW_COUNTS)  # the host's list (``weigh_rows``): no read of a device tensor
    return list(counts) if counts is not None else [int(w) for w in weights.tolist()]
